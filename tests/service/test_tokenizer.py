"""Detokenization of growing rows: the incremental text equals decoding all ids, on the
tokenizers the default models ship with."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from service.tokenizer import SPACE, TextSoFar, Tokenizer

ROOT = Path(__file__).resolve().parents[2]
# (tokenizer, continuation): the translator's outputs start a text, the generator's follow
# a prompt.
TOKENIZERS = {
    "en-es": (ROOT / "models/en-es/checkpoint/tokenizer.model", False),
    "en-lm": (ROOT / "models/en-lm/checkpoint/tokenizer.model", True),
}
BOS, EOS = 2, 3


@functools.cache
def tokenizer(name: str) -> Tokenizer:
    path, continuation = TOKENIZERS[name]
    return Tokenizer(path, BOS, EOS, continuation=continuation)


@functools.cache
def awkward_ids(name: str) -> list[int]:
    """The ids whose text depends on what comes before: control and unknown ids, and the
    pieces that are spaces alone."""
    sp = tokenizer(name).sp
    return [
        i
        for i in range(sp.get_piece_size())
        if sp.is_control(i) or sp.is_unknown(i) or not sp.id_to_piece(i).strip(SPACE)
    ]


@st.composite
def rows(draw: st.DrawFn, name: str) -> list[int]:
    vocab = tokenizer(name).vocab_size
    any_id = st.integers(0, vocab - 1)
    return draw(st.lists(st.one_of(any_id, st.sampled_from(awkward_ids(name))), max_size=60))


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), fold=st.sampled_from([1, 3, TextSoFar.FOLD]))
def test_text_so_far_equals_decoding_every_id(name: str, data: st.DataObject, fold: int) -> None:
    tok = tokenizer(name)
    ids = data.draw(rows(name))
    text = TextSoFar(tok)
    text.FOLD = fold
    for n in range(1, len(ids) + 1):
        assert text(ids[:n]) == tok.decode(ids[:n])
    if len(ids) > 2 * fold:  # the head took over most ids, so the check above covered it
        assert text.settled > 0 or not tok.decode(ids)


def test_a_continuation_keeps_its_spaces_after_control_and_unknown_ids() -> None:
    """A generated row that starts with a control id (no text) or the unknown id (written
    " ⁇ ") still reads as it would inside a longer text: SentencePiece drops the spaces at
    the start of a text, and a continuation puts them back."""
    tok = tokenizer("en-lm")
    sp = tok.sp
    word = sp.piece_to_id(SPACE + "the")
    space = sp.piece_to_id(SPACE)
    assert not sp.is_unknown(word) and not sp.is_unknown(space)
    unknown = sp.unk_id()
    assert tok.decode([0, word]) == " the"  # pad, then a word
    assert tok.decode([EOS, space, unknown]) == "  \u2047 "
    assert tok.decode([unknown, word]) == " \u2047  the"
    # Inside a longer text, the same ids read the same.
    before = sp.encode("And God said")
    for tail in ([0, word], [EOS, space, unknown], [unknown, word]):
        assert tok.decode(before + tail) == tok.decode(before) + tok.decode(tail)


@pytest.mark.parametrize(
    ("prompt", "spaced"),
    [
        ("And God said", True),
        ("And God said ", False),
        ("And God said\n", False),
        ("And God said \u200b", False),  # encoding deletes the zero-width space...
        ("And God said \ufeff\u200b", False),  # ... and the byte-order mark
        ("And God said\u200b", True),  # the last kept character is no space
        ("\u200b", True),
    ],
)
def test_a_continuation_starts_without_a_space_after_a_prompt_ending_in_one(
    prompt: str, spaced: bool
) -> None:
    """prompt + text never doubles a space, even behind characters encoding deletes."""
    tok = tokenizer("en-lm").after(prompt)
    word = tok.sp.piece_to_id(SPACE + "the")
    assert tok.decode([word]) == (" the" if spaced else "the")


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_characters_never_decoded_are_in_no_piece(name: str) -> None:
    """What `never_decoded` flags (so a stop string holding it is refused) is in no
    piece's text; what it lets through reads as typed (NFKC makes U+00A0 a space)."""
    tok = tokenizer(name)
    suspects = "\n\t\r\x0b\u2028\u200b\ufeff"
    assert [tok.never_decoded(f"ok{c}") for c in suspects] == list(suspects)
    decoded = "".join(tok.decode_inner([i]) for i in range(tok.vocab_size))
    assert not set(suspects) & set(decoded)
    for text in ("Amen.", "a b", "\u00a0", " the"):
        assert tok.never_decoded(text) is None, text
    # A letter reads as typed where a piece holds it (the translator's Spanish accents).
    assert (tok.never_decoded("é") is None) == ("é" in decoded)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_characters_outside_the_vocabulary_are_never_decoded(name: str) -> None:
    """A character no piece holds (NUL, an emoji, a letter the training text lacked)
    encodes as the unknown id, whose text is " \u2047 ": no output holds it, so a stop
    string holding it could never match and `never_decoded` flags it."""
    tok = tokenizer(name)
    decoded = "".join(tok.decode_inner([i]) for i in range(tok.vocab_size))
    for char in ("\x00", "\U0001f600", "\u00f6", "\u4e2d"):
        assert char not in decoded
        assert tok.never_decoded(f"Amen{char}") == char, repr(char)


def byte_fallback_model(directory: Path) -> Path:
    """A tokenizer trained with byte fallback: characters its pieces lack are spelled in
    UTF-8 byte pieces (<0x20> is a space)."""
    with (ROOT / "tests/fixtures/verses.tsv").open(encoding="utf-8") as f:
        texts = [row["en"] for row in csv.DictReader(f, delimiter="\t")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(directory / "bytes"),
        vocab_size=400,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=BOS,
        eos_id=EOS,
        minloglevel=2,
    )
    return directory / "bytes.model"


def test_with_byte_pieces_only_what_the_normalizer_drops_is_never_decoded(
    tmp_path: Path,
) -> None:
    """Byte pieces spell any UTF-8, so a tokenizer trained with byte fallback can output a
    letter its pieces lack: only line breaks, tabs and zero-width characters are flagged."""
    tok = Tokenizer(byte_fallback_model(tmp_path), BOS, EOS)
    assert tok.never_decoded("Amen\u00f6\U0001f600") is None
    assert [tok.never_decoded(f"ok{c}") for c in "\n\t\u200b"] == list("\n\t\u200b")


def test_a_byte_piece_of_a_space_counts_among_the_leading_spaces(tmp_path: Path) -> None:
    """<0x20> spells a space: counted as none, a continuation that starts with a word mark
    and it read one space short, and so did a row's text whose head had settled just before
    them (TextSoFar), so a stream or a stop search read otherwise than the whole text."""
    path = byte_fallback_model(tmp_path)
    sp = Tokenizer(path, BOS, EOS).sp
    space, byte = sp.piece_to_id(SPACE), sp.piece_to_id("<0x20>")
    assert sp.id_to_piece(space) == SPACE and sp.is_byte(byte)
    ids = [space, byte, *sp.encode("Amen")]
    assert Tokenizer(path, BOS, EOS, continuation=True).decode(ids) == "   Amen"
    row = [*sp.encode("In the beginning"), *ids, *ids]
    for continuation in (False, True):
        tok = Tokenizer(path, BOS, EOS, continuation=continuation)
        for fold in (1, 2, 3):
            text = TextSoFar(tok)
            text.FOLD = fold
            for n in range(1, len(row) + 1):
                assert text(row[:n]) == tok.decode(row[:n]), (continuation, fold, n)

"""Tests for the corpus builder; all but one run on the committed fixture alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm

from tests.fixtures import VERSES as FIXTURE
from transformer import data
from transformer.data import (
    Bible,
    Pair,
    align_pairs,
    clean_osis,
    lm_lines,
    load_lines,
    load_pairs,
    split_of,
    train_sentencepiece,
    write_lines,
    write_pairs,
)


@pytest.fixture(scope="module")
def fixture_pairs() -> list[Pair]:
    return load_pairs(FIXTURE)


# --- cleaning ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        # WEB John 3:16: a footnote between quote segments glued "only bornSon" in pysword.
        (
            '<q who="Jesus"><w lemma="strong:G3439">only</w> born</q><note placement="foot">'
            '<reference type="annotateRef">3:16 </reference>The phrase “only born” is from the'
            ' Greek.</note><q who="Jesus"><w lemma="strong:G5207">Son</w>, that whoever</q>',
            "only born Son, that whoever",
        ),
        # WEB Gen 1:1: "Godcreated".
        (
            '<w lemma="strong:H0430">God</w><note placement="foot">Elohim.</note>'
            '<w lemma="strong:H1254">created</w> the earth. ',
            "God created the earth.",
        ),
        # A note before punctuation leaves no space.
        ("Amen<note>x</note>.", "Amen."),
        # Line-group milestones between words.
        ("wine;<l eID='a' level='1'/><l level='2' sID='b'/>for your love", "wine; for your love"),
        # KJV leaked USFM and paragraph sign, added words kept.
        (
            '<div sID="gen5" type="x-p"/>¶ For he said, Because the \\nd LORD</divineName> hath '
            '<transChange type="added">sworn</transChange>.',
            "For he said, Because the LORD hath sworn.",
        ),
        # Editorial brackets.
        (
            'the Father: <transChange type="added">[but] he that</transChange>.',
            "the Father: but he that.",
        ),
        # Non-canonical headings dropped, canonical psalm titles kept.
        ('<title type="section">The Fall</title>Now the serpent', "Now the serpent"),
        (
            '<title canonical="true" type="psalm">A Psalm of David.</title> <l level="1"/>'
            "LORD, how",
            "A Psalm of David. LORD, how",
        ),
        # RV1909 added words glued to both neighbours, and a clitic that joins its verb.
        (
            '<w>ejército</w><transChange type="added">se llamaba</transChange><w>Sísara</w>,',
            "ejército se llamaba Sísara,",
        ),
        ('<w>y díjo</w><transChange type="added">le</transChange><w>Dios</w>:', "y díjole Dios:"),
        ('<w>sáca</w><transChange type="added">lo</transChange> <w>de</w>', "sácalo de"),
        (
            '<w>Josué</w><transChange type="added">los</transChange> <w>circuncidó</w>',
            "Josué los circuncidó",
        ),
        ('<w>siempre</w><transChange type="added">es</transChange><w>su</w>', "siempre es su"),
        # Back matter after the chapter end (KJV subscriptions, WEB glossary).
        ('Amen. <chapter eID="Rom.16"/><title>Written to the Romans</title>', "Amen."),
        # Whitespace, doubled commas, NFC (e + combining acute → é).
        ("  Bucita,,  de\n la  familia  cafe\u0301 ", "Bucita, de la familia café"),
        ("", ""),
    ],
)
def test_clean_osis(raw: str, clean: str) -> None:
    assert clean_osis(raw) == clean


def test_fixture_text_is_clean(fixture_pairs: list[Pair]) -> None:
    for p in fixture_pairs:
        for text in (p.en, p.es):
            assert text and text == text.strip()
            assert not any(c in text for c in "<>\\¶\t\n")
            assert "  " not in text


# --- split ---------------------------------------------------------------------------------


def test_split_is_pinned() -> None:
    # Changing the rule would move verses between splits and leak old test verses.
    assert [split_of(r) for r in ("Gen.1.1", "John.3.16", "Gen.2.12", "Gen.2.14")] == [
        "train",
        "train",
        "test",
        "test",
    ]


def test_split_is_deterministic_and_share_is_plausible() -> None:
    refs = [f"Book{b}.{c}.{v}" for b in range(10) for c in range(1, 51) for v in range(1, 63)]
    splits = [split_of(r) for r in refs]
    assert splits == [split_of(r) for r in refs]
    share = Counter(splits)
    n = len(refs)  # 31,000: about the size of the KJV
    assert 0.035 < share["test"] / n < 0.045
    assert 0.013 < share["dev"] / n < 0.019
    assert share["test"] >= 1000


def test_fixture_mixes_splits(fixture_pairs: list[Pair]) -> None:
    splits = Counter(split_of(p.ref) for p in fixture_pairs)
    assert set(splits) == {"train", "dev", "test"}
    assert 300 <= len(fixture_pairs) <= 500
    assert FIXTURE.stat().st_size < 150_000


def _bible(name: str, chapters: dict[str, list[list[str]]]) -> Bible:
    verses = {
        data.ref_of(book, c, v): text
        for book, chs in chapters.items()
        for c, texts in enumerate(chs, 1)
        for v, text in enumerate(texts, 1)
    }
    lengths = {book: [len(texts) for texts in chs] for book, chs in chapters.items()}
    return Bible(name, verses, lengths)


@pytest.fixture(scope="module")
def toy_bibles(fixture_pairs: list[Pair]) -> tuple[Bible, Bible, Bible]:
    """KJV/WEB/RV1909 stand-ins: 10 chapters of 12 fixture verses, renumbered."""
    web_text = {p.ref: p.en for p in fixture_pairs if p.source_module == data.WEB}
    kjv_rows = [p for p in fixture_pairs if p.source_module == data.KJV]
    kjv_rows = sorted(kjv_rows, key=lambda p: p.ref not in web_text)[:120]  # WEB ones first
    chapters = [kjv_rows[i : i + 12] for i in range(0, 120, 12)]
    kjv = _bible(data.KJV, {"Gen": [[p.en for p in ch] for ch in chapters]})
    rv_chapters = [[p.es for p in ch] for ch in chapters]
    rv_chapters[3][-1] = ""  # chapter 4 ends early: its text spilled into chapter 5
    rv = _bible(data.RV1909, {"Gen": rv_chapters})
    web = _bible(
        data.WEB,
        {
            "Gen": [[web_text.get(p.ref, p.en) for p in ch] for ch in chapters],
            "EsthGr": [["In the second year of the reign of Ahasuerus the great king."]],
            "Tob": [["The book of the words of Tobit."]],
        },
    )
    return kjv, web, rv


def test_align_pairs_by_split(toy_bibles: tuple[Bible, Bible, Bible]) -> None:
    kjv, web, rv = toy_bibles
    pairs = align_pairs(kjv, rv, web)
    for split, rows in pairs.items():
        assert all(split_of(p.ref) == split for p in rows)
        if split != "train":
            # One comparable pair per reference, from the KJV.
            assert all(p.source_module == data.KJV for p in rows)
            assert len({p.ref for p in rows}) == len(rows)
    refs = {p.ref for rows in pairs.values() for p in rows}
    # Chapter 4 has an empty verse and chapter 5 received its text: both dropped.
    assert not any(r.startswith(("Gen.4.", "Gen.5.")) for r in refs)
    assert sum(r.startswith("Gen.6.") for r in refs) >= 6
    assert {p.source_module for p in pairs["train"]} == {data.KJV, data.WEB}
    assert sum(map(len, pairs.values())) > 100


def test_align_pairs_drops_shifted_chapter(toy_bibles: tuple[Bible, Bible, Bible]) -> None:
    kjv, _, rv = toy_bibles
    shifted = dict(rv.verses)
    refs = [data.ref_of("Gen", 2, v) for v in range(1, 13)]
    texts = [rv.verses[r] for r in refs]
    for r, t in zip(refs, [texts[0] + " " + texts[1], *texts[2:], texts[0][:10]], strict=True):
        shifted[r] = t
    pairs = align_pairs(kjv, Bible(rv.name, shifted, rv.chapter_lengths))
    assert not any(p.ref.startswith("Gen.2.") for rows in pairs.values() for p in rows)


def test_train_never_repeats_a_held_out_text(toy_bibles: tuple[Bible, Bible, Bible]) -> None:
    kjv, web, rv = toy_bibles
    held = next(p for p in align_pairs(kjv, rv)["test"])
    # The same verse text under a train reference of another book.
    extra = Bible(kjv.name, {**kjv.verses, "Exod.1.1": held.en}, {**kjv.chapter_lengths})
    extra.chapter_lengths["Exod"] = [1]
    rv_extra = Bible(rv.name, {**rv.verses, "Exod.1.1": held.es}, extra.chapter_lengths)
    assert split_of("Exod.1.1") == "train"
    pairs = align_pairs(extra, rv_extra, web)
    assert held in pairs["test"]
    train_text = {t for p in pairs["train"] for t in (p.en, p.es)}
    assert held.en not in train_text and held.es not in train_text


def test_lm_lines_follow_split_rule(toy_bibles: tuple[Bible, Bible, Bible]) -> None:
    kjv, web, _ = toy_bibles
    lines = lm_lines(web, kjv)
    by_text = {text: ref for ref, text in web.verses.items() if not ref.startswith("EsthGr")}
    for split, texts in lines.items():
        assert all(split_of(by_text[t]) == split for t in texts)
    everything = [t for texts in lines.values() for t in texts]
    assert web.verses["Tob.1.1"] in everything  # deuterocanon kept
    assert len(everything) == len(by_text)  # Greek Esther left out


# --- files ---------------------------------------------------------------------------------


def test_load_pairs_round_trip(fixture_pairs: list[Pair], tmp_path: Path) -> None:
    tricky = Pair("Gen.1.1", data.WEB, "He said, \"Yes\u201d — it's", "Dijo: «Sí»\u00a0¿no?")
    path = tmp_path / "pairs.tsv"
    assert write_pairs([*fixture_pairs, tricky], path) == len(fixture_pairs) + 1
    assert load_pairs(path) == [*fixture_pairs, tricky]
    assert path.read_text(encoding="utf-8").splitlines()[0] == "ref\tsource_module\ten\tes"


def test_load_pairs_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        load_pairs(path)


def test_load_lines_round_trip(fixture_pairs: list[Pair], tmp_path: Path) -> None:
    lines = [p.en for p in fixture_pairs]
    path = tmp_path / "lm.txt"
    write_lines(lines, path)
    assert load_lines(path) == lines


# --- tokenizer -----------------------------------------------------------------------------


def test_tiny_sentencepiece(fixture_pairs: list[Pair], tmp_path: Path) -> None:
    texts = [p.en for p in fixture_pairs] + [p.es for p in fixture_pairs]
    model = train_sentencepiece(texts, tmp_path / "a" / "tiny", vocab_size=200)
    assert model == tmp_path / "a" / "tiny.model"
    assert (tmp_path / "a" / "tiny.vocab").exists()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.get_piece_size() == 200
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    for text in texts:
        ids = sp.encode(text)
        assert data.UNK_ID not in ids  # character_coverage=1.0
        assert sp.decode(ids) == text
    ids = sp.encode("El principio 漢", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 3 and 1 in ids
    # Same texts, same pieces and scores.
    train_sentencepiece(texts, tmp_path / "b" / "tiny", vocab_size=200)
    assert (tmp_path / "a" / "tiny.vocab").read_bytes() == (
        tmp_path / "b" / "tiny.vocab"
    ).read_bytes()


# --- the real modules ----------------------------------------------------------------------


@pytest.mark.slow
def test_real_modules() -> None:
    if not (data.SWORD_PATH / "mods.d").is_dir():
        pytest.skip(f"no SWORD modules in {data.SWORD_PATH} (Debian sword-text-* packages)")
    pytest.importorskip("pysword")
    kjv, rv = data.read_bible(data.KJV), data.read_bible(data.RV1909)
    assert len(kjv.verses) == len(rv.verses) == 31102
    assert kjv.verses["John.3.16"].startswith("For God so loved the world")
    assert rv.verses["1Kgs.3.5"].endswith("y díjole Dios: Pide lo que quisieres que yo te dé.")
    assert not any("<" in t or ">" in t for t in (*kjv.verses.values(), *rv.verses.values()))
    pairs = align_pairs(kjv, rv)
    assert len({p.ref for p in pairs["test"]}) >= 1000
    assert 400 <= len(pairs["dev"]) <= 600
    assert sum(map(len, pairs.values())) > 29_000

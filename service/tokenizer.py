"""SentencePiece tokenization as the models were trained: translator sources end with EOS,
language-model prompts start with BOS; text is rebuilt from whole id prefixes, never piece
by piece, so a word split over several pieces (and the space before it) comes out right.
A continuation keeps the space its first piece carries (unless the prompt ended with one),
so prompt + text reads right."""

from __future__ import annotations

import copy
import unicodedata
from pathlib import Path

import sentencepiece as spm

REPLACEMENT = "\ufffd"  # what decode yields for an incomplete UTF-8 byte sequence
SPACE = "\u2581"  # SentencePiece's word-boundary mark: a space in the text
UNKNOWN = " \u2047 "  # what SentencePiece writes for the unknown id, spaces included


class Tokenizer:
    """One model version's SentencePiece processor with the special ids of its config.

    `continuation`: the decoded ids follow a prompt (a language model's output), so the
    leading spaces SentencePiece drops at the start of a text are kept.
    """

    def __init__(
        self, model_file: str | Path, bos_id: int, eos_id: int, continuation: bool = False
    ) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.continuation = continuation
        self._after_space: Tokenizer | None = None
        self._output_chars = self._decodable_chars()

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode_source(self, text: str) -> list[int]:
        """Translator input: pieces then EOS (what training fed the encoder)."""
        return [*self.sp.encode(text), self.eos_id]

    def encode_prompt(self, text: str) -> list[int]:
        """Language-model input: BOS then pieces (the model continues after them)."""
        return [self.bos_id, *self.sp.encode(text)]

    def after(self, prompt: str) -> Tokenizer:
        """The tokenizer of the text that follows `prompt`. A continuation keeps the space
        its first piece carries, but after a prompt that ends with one (which encoding
        dropped) it starts without it, so prompt + text never doubles the space."""
        if not self.continuation or not self._ends_with_space(prompt):
            return self
        if self._after_space is None:
            self._after_space = copy.copy(self)  # the same processor
            self._after_space.continuation = False
        return self._after_space

    def _ends_with_space(self, prompt: str) -> bool:
        """Whether the prompt's last character that encoding keeps is whitespace: one it
        deletes (a zero-width space, a byte-order mark) does not hide the space before."""
        for char in reversed(prompt):
            if char.isspace():
                return True
            if self.sp.normalize(char):
                return False
        return False

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids, self.continuation)

    def decode_inner(self, ids: list[int]) -> str:
        """The text of ids that follow other ids: their leading spaces kept, as they read
        in the whole text (`TextSoFar` joins such pieces)."""
        return self._decode(ids, True)

    def _decode(self, ids: list[int], keep_leading_spaces: bool) -> str:
        text = str(self.sp.decode(ids))
        if keep_leading_spaces:
            dropped = self._leading_spaces(ids) - (len(text) - len(text.lstrip(" ")))
            if dropped > 0:
                text = " " * dropped + text
        return text

    def _leading_spaces(self, ids: list[int]) -> int:
        """Spaces the pieces spell before their first other character."""
        n = 0
        for i in ids:
            if self.sp.is_control(i):  # BOS, EOS, pad: no text at all
                continue
            if self.sp.is_unknown(i):
                piece = UNKNOWN
            elif self.sp.is_byte(i):  # spells its byte: <0x20> is a space
                piece = str(self.sp.decode([i]))
            else:
                piece = str(self.sp.id_to_piece(i))
            rest = piece.lstrip(SPACE + " ")
            n += len(piece) - len(rest)
            if rest:
                break
        return n

    @staticmethod
    def output_form(text: str) -> str:
        """`text` in the Unicode form decoded text takes (our tokenizers normalize with
        nmt_nfkc), so a stop string typed in another form (an accent as a combining mark)
        still matches the output."""
        return unicodedata.normalize("NFKC", text)

    def _decodable_chars(self) -> frozenset[str] | None:
        """Every character a decoded text can hold in output form: those of the pieces (a
        word mark reads as a space; the unknown id's mark "⁇" is "??" in NFKC); None when
        any character can come out (byte pieces spell arbitrary UTF-8)."""
        sp = self.sp
        chars: set[str] = set()
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                return None
            if not (sp.is_control(i) or sp.is_unknown(i)):
                chars.update(str(sp.id_to_piece(i)).replace(SPACE, " "))
        return frozenset(chars)

    def never_decoded(self, text: str) -> str | None:
        """The first character of `text` (in output form) that no decoded text contains:
        one the normalizer turns into a space (a line break, a tab) or deletes (a zero-width
        space), or one no piece holds (NUL, an emoji or a letter outside the vocabulary:
        it encodes as the unknown id, which decodes as " ⁇ "), so a stop string holding it
        could never match."""
        gone = (f"{SPACE}aa", f"{SPACE}a{SPACE}a")  # "a?a" with ? deleted, or made a space
        for char in self.output_form(text):
            if char == " ":
                continue
            if self._output_chars is not None:  # a piece's characters survive normalizing
                if char not in self._output_chars:
                    return char
            elif self.sp.normalize(f"a{char}a") in gone:
                return char
        return None

    def pieces(self, ids: list[int]) -> list[str]:
        return [str(piece) for piece in self.sp.id_to_piece(list(ids))]  # one call for all


class TextSoFar:
    """The text of one row's ids as they grow by a token per step, equal at every step to
    `tokenizer.decode(ids)`, at a cost that does not grow with the length.

    Decoding all ids every step costs more the longer the row (about 4 µs at 32 ids and
    28 µs at 512 here), which a streamed or stop-checked row pays every step. As TGI and
    vLLM detokenize incrementally, the text of a settled head is kept and only the ids
    after it are decoded; the head grows by `FOLD` ids once their text is whole (no
    incomplete UTF-8 character at its end) and not empty (so the tokenizer's rule for the
    start of a text has been applied to it)."""

    FOLD = 16

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.head = ""  # the text of ids[: self.settled]
        self.settled = 0

    def __call__(self, ids: list[int]) -> str:
        """The text of `ids`, which extend the ids of the previous call."""
        if self.settled:
            tail = self.tokenizer.decode_inner(ids[self.settled :])
        else:
            tail = self.tokenizer.decode(ids)
        if len(ids) - self.settled >= self.FOLD and tail and not tail.endswith(REPLACEMENT):
            self.head += tail
            self.settled = len(ids)
            return self.head
        return self.head + tail


def stable_prefix(text: str, stop: tuple[str, ...]) -> str:
    """The part of `text` that can be streamed now: without a trailing incomplete character
    and without a suffix that could still grow into a stop string (held back until known)."""
    end = len(text)
    while end > 0 and text[end - 1] == REPLACEMENT:
        end -= 1
    text = text[:end]
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]


def find_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int:
    """Index in `text` where the earliest stop string (at or after `start`) begins, or -1."""
    best = -1
    for s in stop:
        i = text.find(s, start)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


__all__ = ["REPLACEMENT", "TextSoFar", "Tokenizer", "find_stop", "stable_prefix"]

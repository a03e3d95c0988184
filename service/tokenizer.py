"""SentencePiece tokenization as the models were trained: translator sources end with EOS,
language-model prompts start with BOS; text is rebuilt from whole id prefixes, never piece
by piece, so a word split over several pieces (and the space before it) comes out right.
A continuation keeps the space its first piece carries, so prompt + text reads right."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

REPLACEMENT = "\ufffd"  # what decode yields for an incomplete UTF-8 byte sequence
SPACE = "\u2581"  # SentencePiece's word-boundary mark: a space in the text


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

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode_source(self, text: str) -> list[int]:
        """Translator input: pieces then EOS (what training fed the encoder)."""
        return [*self.sp.encode(text), self.eos_id]

    def encode_prompt(self, text: str) -> list[int]:
        """Language-model input: BOS then pieces (the model continues after them)."""
        return [self.bos_id, *self.sp.encode(text)]

    def decode(self, ids: list[int]) -> str:
        text = str(self.sp.decode(ids))
        if self.continuation:
            dropped = self._leading_spaces(ids) - (len(text) - len(text.lstrip(" ")))
            if dropped > 0:
                text = " " * dropped + text
        return text

    def _leading_spaces(self, ids: list[int]) -> int:
        """Spaces the pieces spell before their first other character."""
        n = 0
        for i in ids:
            piece = str(self.sp.id_to_piece(i))
            rest = piece.lstrip(SPACE)
            n += len(piece) - len(rest)
            if rest:
                break
        return n

    def pieces(self, ids: list[int]) -> list[str]:
        return [str(piece) for piece in self.sp.id_to_piece(list(ids))]  # one call for all


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


__all__ = ["Tokenizer", "find_stop", "stable_prefix"]

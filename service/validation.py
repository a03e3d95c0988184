"""Request validation: protobuf options → domain `DecodingParams`, or `InvalidArgument`.

Every refusal names the field (as the caller spells it, e.g. `options.top_p`, `texts[2]`)
and the limit, so nothing is truncated or ignored silently.

The numeric options whose 0 means nothing (`max_new_tokens`, `beam_size`, `n_best`,
`length_penalty`, `top_p`, `seed`) are proto3 `optional`: unset takes the server's default,
and an explicit 0 is seen and refused where it is out of range.
"""

from __future__ import annotations

import math
import re
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.domain import DecodingParams, InvalidArgument, Task

if TYPE_CHECKING:
    from service.gen.inference.v1 import inference_pb2 as pb
    from service.settings import Settings

# A SentencePiece token covers at most a few characters of Bible text, never this many:
# texts longer than max_input_tokens * CHARS_PER_TOKEN_BOUND are refused before tokenizing
# (counted as the tokenizer reads them: NFKC-normalized, a run of spaces as one), which
# also bounds the tokenizer's time on the event loop.
CHARS_PER_TOKEN_BOUND = 32
# The most characters NFKC makes of one (U+FDFA: 18): shorter texts need no normalizing.
_NFKC_MAX_GROWTH = 18
# Longer ones are normalized a chunk at a time, stopping once past the bound: normalizing
# costs by the characters it makes (13 ms for 8,192 × U+FDFA), on the event loop.
_NFKC_CHUNK = 1024
# A run of spaces counts as one, but counting it costs by the characters sent: a text may
# be at most this many times the bound as sent (4 MB of spaces and a letter took 0.7 s of
# the event loop to count, 2 M combining marks 0.5 s).
SENT_CHARS_FACTOR = 4
# A model's name is its folder's, which common file systems keep to 255 bytes; a longer
# request field names no model, and echoing it would swell the status message.
MAX_MODEL_NAME_CHARS = 255
MAX_TEMPERATURE = 100.0
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})  # Unicode categories with no glyph
_WHITESPACE_RUN = re.compile(r"\s+")
# Sampling this cold is greedy but for ties; far colder, logits / temperature overflows
# float32 (NaN probabilities). Greedy is temperature 0.
MIN_TEMPERATURE = 1e-6
# ... as the float32 field carries it (1e-6 arrives as 9.99999997e-07).
_MIN_TEMPERATURE_F32: float = struct.unpack("<f", struct.pack("<f", MIN_TEMPERATURE))[0]
MAX_LENGTH_PENALTY = 10.0
MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    """The request-size limits validation enforces (from Settings)."""

    max_input_tokens: int = 256
    default_max_new_tokens: int = 128
    max_new_tokens: int = 512
    max_texts_per_request: int = 64
    max_beam_size: int = 8
    max_stop_strings: int = 8
    max_stop_chars: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_input_tokens=settings.max_input_tokens,
            default_max_new_tokens=settings.default_max_new_tokens,
            max_new_tokens=settings.max_new_tokens,
            max_texts_per_request=settings.max_texts_per_request,
            max_beam_size=settings.max_beam_size,
            max_stop_strings=settings.max_stop_strings,
            max_stop_chars=settings.max_stop_chars,
        )


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise InvalidArgument(name, f"must be a finite number, got {value}")
    return float(value)


def _at_least_one(name: str, value: int, default: str) -> int:
    if value < 1:
        raise InvalidArgument(
            name, f"must be at least 1, got {value} (leave it unset for {default})"
        )
    return value


def decoding_params(
    options: pb.DecodingOptions,
    limits: RequestLimits,
    task: Task = Task.TRANSLATION,
    stream: bool = False,
) -> DecodingParams:
    """Validate `options` and apply defaults; raises InvalidArgument naming the field."""
    max_new = limits.default_max_new_tokens
    if options.HasField("max_new_tokens"):
        max_new = _at_least_one(
            "options.max_new_tokens", options.max_new_tokens, "the server's default"
        )
    if max_new > limits.max_new_tokens:
        raise InvalidArgument(
            "options.max_new_tokens", f"{max_new} exceeds the limit {limits.max_new_tokens}"
        )
    beam = 1
    if options.HasField("beam_size"):
        beam = _at_least_one("options.beam_size", options.beam_size, "greedy decoding")
    if beam > limits.max_beam_size:
        raise InvalidArgument(
            "options.beam_size", f"{beam} exceeds the limit {limits.max_beam_size}"
        )
    n_best = 1
    if options.HasField("n_best"):
        n_best = _at_least_one("options.n_best", options.n_best, "one hypothesis")
    if n_best > beam:
        raise InvalidArgument(
            "options.n_best",
            f"{n_best} exceeds beam_size {beam} (n_best must be ≤ beam_size)",
        )
    if stream and n_best > 1:
        raise InvalidArgument(
            "options.n_best",
            f"{n_best}: a stream returns one hypothesis (n_best ≤ 1); use the unary call",
        )

    temperature = _finite("options.temperature", options.temperature)
    if temperature < 0.0:
        raise InvalidArgument("options.temperature", f"must be ≥ 0, got {temperature}")
    if temperature > MAX_TEMPERATURE:
        raise InvalidArgument(
            "options.temperature", f"{temperature} exceeds the limit {MAX_TEMPERATURE}"
        )
    if 0.0 < temperature < _MIN_TEMPERATURE_F32:
        raise InvalidArgument(
            "options.temperature",
            f"{temperature} is below the smallest sampling temperature {MIN_TEMPERATURE}; "
            "use 0 for greedy decoding",
        )
    sampling = temperature > 0.0
    if sampling and beam > 1:
        raise InvalidArgument(
            "options.beam_size",
            f"{beam}: sampling (temperature > 0) needs beam_size ≤ 1; "
            "set temperature 0 for beam search",
        )

    length_penalty = 1.0
    if options.HasField("length_penalty"):
        length_penalty = _finite("options.length_penalty", options.length_penalty)
        if not 0.0 <= length_penalty <= MAX_LENGTH_PENALTY:
            raise InvalidArgument(
                "options.length_penalty",
                f"must be in [0, {MAX_LENGTH_PENALTY}], got {length_penalty}",
            )

    if options.HasField("length_penalty") and beam == 1:
        raise InvalidArgument(
            "options.length_penalty", "only applies to beam search; set beam_size > 1"
        )
    if options.HasField("seed") and not sampling:
        raise InvalidArgument("options.seed", "only applies when sampling; set temperature > 0")

    top_p = 1.0
    if options.HasField("top_p"):
        top_p = _finite("options.top_p", options.top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("options.top_p", f"must be in (0, 1], got {top_p}")
    top_k = options.top_k
    if top_k > MAX_TOP_K:
        raise InvalidArgument("options.top_k", f"{top_k} exceeds the limit {MAX_TOP_K}")
    if not sampling and (top_k or top_p < 1.0):
        name = "options.top_k" if top_k else "options.top_p"
        raise InvalidArgument(name, "only applies when sampling; set temperature > 0")

    stop = tuple(options.stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "options.stop", f"{len(stop)} strings exceed the limit {limits.max_stop_strings}"
        )
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument(f"options.stop[{i}]", "is empty")
        if len(s) > limits.max_stop_chars:
            raise InvalidArgument(
                f"options.stop[{i}]",
                f"{len(s)} characters exceed the limit {limits.max_stop_chars}",
            )

    if options.return_alignment and task is not Task.TRANSLATION:
        raise InvalidArgument(
            "options.return_alignment", "only translation models have cross-attention"
        )

    return DecodingParams(
        max_new_tokens=max_new,
        max_new_tokens_default=not options.HasField("max_new_tokens"),
        beam_size=beam,
        n_best=n_best,
        length_penalty=length_penalty,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=options.seed if options.HasField("seed") else None,
        stop=stop,
        return_scores=options.return_scores,
        return_alignment=options.return_alignment,
    )


def text(field_name: str, value: str, limits: RequestLimits) -> str:
    """Refuse an empty (or blank) text, one with nothing to read (only control or format
    characters, such as NUL or zero-width spaces), and one too long to be worth tokenizing."""
    if not value.strip():
        raise InvalidArgument(field_name, "is empty")
    bound = limits.max_input_tokens * CHARS_PER_TOKEN_BOUND
    if len(value) > SENT_CHARS_FACTOR * bound:  # before any per-character look
        raise InvalidArgument(
            field_name,
            f"{len(value)} characters exceed the limit {SENT_CHARS_FACTOR * bound} as sent "
            f"({SENT_CHARS_FACTOR} × max_input_tokens {limits.max_input_tokens} × "
            f"{CHARS_PER_TOKEN_BOUND}, whitespace included)",
        )
    if all(unicodedata.category(c) in _INVISIBLE for c in value):
        raise InvalidArgument(
            field_name, "has no visible characters (only spaces, control or format characters)"
        )
    if len(value) * _NFKC_MAX_GROWTH > bound:
        size, start = 0, 0
        while start < len(value):
            end = min(start + _NFKC_CHUNK, len(value))
            # A run of spaces, or a letter and its combining marks, stay in one chunk: the
            # chunks then count what the whole text does.
            while end < len(value) and (value[end].isspace() or unicodedata.combining(value[end])):
                end += 1
            chunk = unicodedata.normalize("NFKC", value[start:end])
            size += len(_WHITESPACE_RUN.sub(" ", chunk))
            start = end
            if size > bound:
                counted = "" if end == len(value) else "at least "
                raise InvalidArgument(
                    field_name,
                    f"{counted}{size} characters exceed the limit {bound} (max_input_tokens "
                    f"{limits.max_input_tokens} × {CHARS_PER_TOKEN_BOUND}; counted after NFKC "
                    "normalization, a run of spaces as one)",
                )
    return value


def model_name(field_name: str, value: str) -> str:
    """Refuse a model name no model folder can have (before it is echoed in an error)."""
    if len(value) > MAX_MODEL_NAME_CHARS:
        raise InvalidArgument(
            field_name, f"{len(value)} characters exceed the limit {MAX_MODEL_NAME_CHARS}"
        )
    return value


def texts(values: Sequence[str], limits: RequestLimits) -> list[str]:
    """Validate a Translate call's texts: non-empty list, at most the limit, each valid."""
    if not values:
        raise InvalidArgument("texts", "is empty; give at least one text")
    if len(values) > limits.max_texts_per_request:
        raise InvalidArgument(
            "texts",
            f"{len(values)} texts exceed the limit {limits.max_texts_per_request} per request",
        )
    return [text(f"texts[{i}]", v, limits) for i, v in enumerate(values)]


def version(value: int) -> int | None:
    """proto version 0 means the newest version taking calls."""
    return value or None

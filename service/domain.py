"""Domain types shared by transport, scheduler and engine; none of them knows gRPC.

The servicer converts protobuf to these types and back; the scheduler queues and batches
`SequenceRequest`s; the engine decodes them. Errors are `ServiceError` subclasses, each
mapped to one gRPC status code in one place (service/errors.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

# An x-request-id the server logs as given; it replaces any other with a fresh one, so the
# client refuses those. Matched whole (fullmatch): `$` would let a trailing newline through,
# which grpc then refuses to send back in the trailer (the call fails with INTERNAL).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class Task(StrEnum):
    TRANSLATION = "translation"
    GENERATION = "generation"


class FinishReason(StrEnum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class DecodingParams:
    """Validated decoding options for one sequence (defaults already applied)."""

    max_new_tokens: int = 128
    beam_size: int = 1
    n_best: int = 1
    length_penalty: float = 1.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_scores: bool = False
    return_alignment: bool = False
    # max_new_tokens is the server's default (the caller left it unset): the model may
    # lower it to what fits its limits instead of refusing the request.
    max_new_tokens_default: bool = False

    @property
    def sampling(self) -> bool:
        return self.temperature > 0.0


@dataclass(frozen=True)
class SequenceRequest:
    """One text to translate or one prompt to continue."""

    task: Task
    text: str
    params: DecodingParams
    model: str = ""  # empty: the default model for the task
    version: int | None = None  # None: the newest taking calls
    request_id: str = ""
    # time.monotonic() by which the answer must be ready; None: no deadline.
    deadline: float | None = None


@dataclass
class HypothesisResult:
    text: str
    token_ids: list[int]
    tokens: list[str]  # pieces, aligned with alignment rows
    # Summed log-probability: a beam's always, a greedy or sampled request's only if it
    # asked for it (return_scores; 0 otherwise, never sent).
    score: float
    normalized_score: float
    finish_reason: FinishReason
    alignment: list[list[float]] | None = None  # [len(tokens), len(source_tokens)]


@dataclass
class SequenceResult:
    model: str
    version: int
    hypotheses: list[HypothesisResult]  # n_best, best first
    input_tokens: int
    source_tokens: list[str] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(len(h.token_ids) for h in self.hypotheses)


@dataclass
class TokenEvent:
    """Streamed increment: new token ids and the text they complete (may be empty)."""

    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class ModelStatus:
    """One loaded model version as Models.ListModels/DescribeModel report it."""

    name: str
    version: int
    task: Task
    source_language: str
    target_language: str
    dtype: str  # variant served: fp32, fp16 or int8
    provider: str  # onnxruntime execution provider
    max_input_tokens: int  # the model's limits (the transport applies the settings' too)
    max_new_tokens: int
    versions: tuple[int, ...]  # every loaded version of this name
    ready: bool
    config: dict[str, Any] = field(default_factory=dict)
    max_positions: int = 0  # a prompt and its output share them (language models)


@dataclass(frozen=True)
class ReloadSummary:
    """What a reload changed: `name:version` strings; failed maps a folder to the reason."""

    loaded: list[str]
    retired: list[str]
    failed: dict[str, str] = field(default_factory=dict)


class ServiceError(Exception):
    """Base of the errors a caller can be told about; message names the cause and limit.

    `reason` is why the call failed, in a word: the `reason` label of
    inference_request_failures_total and of the call's log line. A status code alone
    cannot tell a full queue from an over-size answer (both RESOURCE_EXHAUSTED), nor a
    drain from a failed engine (both UNAVAILABLE).

    `facts`: what a client's code may act on without parsing the message (the model, the
    limit, the estimate), sent as the metadata of the status's google.rpc.ErrorInfo."""

    reason: str = "unknown"

    def __init__(self, message: str = "", **facts: str | int | float) -> None:
        super().__init__(message)
        self.facts = {key: _fact(value) for key, value in facts.items()}


def _fact(value: str | int | float) -> str:
    """ErrorInfo metadata holds strings: seconds to the millisecond, counts as digits."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class InvalidArgument(ServiceError):
    reason = "invalid_argument"

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.description = message  # the message without its field, for BadRequest
        # Which sequence of a call it concerns (Scheduler.submit_all), when there are several.
        self.index: int | None = None


class ResponseTooLarge(ServiceError):
    """The answer is over the server's max message size (known as its texts decode)."""

    reason = "response_too_large"


class RequestTooLarge(ServiceError):
    """The request is over the server's max message size."""

    reason = "request_too_large"


class RequestTimeout(ServiceError):
    """The request did not arrive within the server's read timeout."""

    reason = "request_timeout"


class ModelNotFound(ServiceError):
    reason = "model_not_found"


class QueueFull(ServiceError):
    reason = "queue_full"


class TooManyCalls(ServiceError):
    """Over the calls the server holds at once (SERVE_MAX_CALLS), or over the bytes of
    their answers grpc has not delivered (SERVE_MAX_ANSWER_BYTES)."""

    reason = "too_many_calls"


class DeadlineUnmeetable(ServiceError):
    """Refused at admission: the estimated queue wait (and, for a unary call that would
    share the loop with others, its own expected decode time) exceeds the time left."""

    reason = "deadline_unmeetable"


class DeadlineExceeded(ServiceError):
    reason = "deadline_exceeded"


class Cancelled(ServiceError):
    reason = "cancelled"


class RequestCut(ServiceError):
    """The request never arrived whole and grpc ended the call: its client went away while
    sending it, or it was over grpc's own size limit (2 x the max message size), which grpc
    refused with RESOURCE_EXHAUSTED itself. The handler sees both alike."""

    reason = "request_cut"


UnavailableReason = Literal["loading", "draining", "retired", "engine_failed"]


class Unavailable(ServiceError):
    """Not serving this call now; a retry (here later, or on another replica) may succeed.

    `reason`: loading (models not warm yet), draining (shutdown, or the model version's
    loop is stopping), retired (the version a call resolved was retired by a reload in the
    meantime), engine_failed (the version's engine died)."""

    def __init__(self, message: str, *, reason: UnavailableReason) -> None:
        super().__init__(message)
        self.reason = reason


class Unauthenticated(ServiceError):
    reason = "unauthenticated"


# The longest bearer token: grpc refuses a call whose headers pass 8 KiB at random (always
# past 16 KiB), and the call's other headers need room beside it.
MAX_TOKEN_CHARS = 4096


def bearer_token(value: str) -> str | None:
    """A bearer token as a header carries it, for the server and the client alike:
    surrounding whitespace (a secret file's newline) dropped, None when nothing is left;
    ValueError for a character a header cannot carry, or a token too long for grpc's
    header limit (the message never shows the token)."""
    token = value.strip()
    if not all("!" <= c <= "~" for c in token):
        raise ValueError("has characters a gRPC header cannot carry: use visible ASCII, no spaces")
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(
            f"is {len(token):,} characters, over {MAX_TOKEN_CHARS:,}: grpc refuses calls whose "
            "headers pass 8 KiB (some at random, all past 16 KiB); use a shorter token"
        )
    return token or None

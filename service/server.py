"""gRPC transport: servicers, server assembly and lifecycle (start, drain, reload).

The servicers only convert protobuf ↔ domain types and call the backend (the scheduler);
what every call shares — request id, auth, drain refusal, deadline, error mapping, metrics
and logs — happens once, in `Transport.unary` / `Transport.stream`. Health
(grpc.health.v1) and reflection are separate services and stay open without a token.

Lifecycle (`serve`): bind the port with health NOT_SERVING, load and warm every model,
then SERVING. SIGTERM/SIGINT: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls
get up to drain_grace_s to finish; what is left then ends (a stream with its answer so
far, finish reason CANCELLED; a unary call UNAVAILABLE), and the process exits 0. One that
comes while the models load and warm ends the warm-up at its next shape (the scheduler's
stop()): the process exits 0 within seconds, never SERVING.
SIGHUP (or Models.Reload) loads new model versions beside the running ones, which retire
once the new ones serve (beyond keep_versions) and their in-flight calls have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import resource
import signal
import socket
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import signals, validation
from service.domain import (
    REQUEST_ID,
    Cancelled,
    DeadlineExceeded,
    DecodingParams,
    FinishReason,
    HypothesisResult,
    InvalidArgument,
    ModelStatus,
    ReloadSummary,
    RequestCut,
    RequestTimeout,
    RequestTooLarge,
    ResponseTooLarge,
    SequenceRequest,
    SequenceResult,
    ServiceError,
    Task,
    TokenEvent,
    TooManyCalls,
    Unauthenticated,
    Unavailable,
)
from service.errors import (
    CLIENT_SIDE_REASONS,
    DETAILS_KEY,
    code_name,
    rich_status,
    sent_message,
    status_of,
)
from service.gen.inference.v1 import inference_pb2 as pb
from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc
from service.health import Health
from service.logging import request_id_var
from service.metrics import UNKNOWN_MODEL_LABEL, Metrics
from service.metrics_http import MetricsServer
from service.settings import ENV_PREFIX, Settings
from service.tls import check_key_permissions, check_served_certificate

log = logging.getLogger("service.server")

SERVICE_NAMES: dict[str, str] = {
    "translator": pb.DESCRIPTOR.services_by_name["Translator"].full_name,
    "generator": pb.DESCRIPTOR.services_by_name["Generator"].full_name,
    "models": pb.DESCRIPTOR.services_by_name["Models"].full_name,
}
REQUEST_ID_KEY = "x-request-id"
# What the caller of each RPC can change when its answer is over the max message size.
_TOO_LARGE_HINTS = {
    "Translate": "ask for fewer texts, a smaller n_best, or no alignment",
    "TranslateStream": "ask for no alignment (the last chunk carries it)",
    "GenerateUnary": "ask for a smaller n_best or fewer max_new_tokens",
    "Generate": "ask for fewer max_new_tokens",
}
FINISH_REASON_PB = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
# After the last in-flight call of a drain, how long new calls still get UNAVAILABLE.
DRAIN_LINGER_S = 1.0
# Bounds of the metrics endpoint, whose server holds threads per connection
# (service/metrics_http.py): how long it waits on a connection's next bytes, how long it
# keeps one at most, and how many it serves at once (a scrape takes milliseconds).
METRICS_READ_TIMEOUT_S = 30.0
METRICS_CONNECTION_S = 60.0
METRICS_MAX_CONNECTIONS = 16
# How long a failed write (or abort) waits for grpc.aio to report that the client has gone.
WRITE_FAILURE_GRACE_S = 1.0
# A cancellation in the last 5 % of a call's deadline (at least 0.1 s, at most 1 s) is
# counted as DEADLINE_EXCEEDED.
DEADLINE_SLACK = 0.05
DEADLINE_SLACK_S = (0.1, 1.0)
# How long a call whose request read as EOF waits for grpc's cancellation (Transport._read).
EOF_GRACE_S = 0.5
T = TypeVar("T")
# When the handler of the call whose task this is began (time.monotonic()), before its
# request was read: set by `Transport.began`, read by `Transport._call` (None: unset).
_call_began: ContextVar[float | None] = ContextVar("call_began", default=None)
# The answers of the call whose task this is, that grpc holds until it is done with the
# call: set by `Transport.hold`, added to by `Transport.fits` (None: a call not held).
_call_answers: ContextVar[_Answers | None] = ContextVar("call_answers", default=None)


class _Answers:
    """Bytes of one call's answer messages, held by grpc until it is done with the call."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size = 0


# --- what the transport needs from the scheduler side -----------------------------------


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says which setting to change."""


class Backend(Protocol):
    """The scheduler side as the transport sees it (service.scheduler.Scheduler; tests fake it)."""

    async def start(self) -> ReloadSummary:
        """Load and warm every model; returns when they can serve."""

    async def submit(self, request: SequenceRequest) -> SequenceResult:
        """Decode one sequence to its end (cancelling the awaiting task cancels the work)."""

    async def submit_all(
        self,
        requests: Sequence[SequenceRequest],
        check: Callable[[int, SequenceResult], None] | None = None,
    ) -> list[SequenceResult]:
        """Decode a call's sequences together: all queued at once or none (QueueFull; an
        InvalidArgument's `index` names the sequence), the first failure cancels the rest,
        as does what `check(i, result)` raises for a result as it comes."""

    def stream(self, request: SequenceRequest) -> AsyncIterator[TokenEvent | SequenceResult]:
        """TokenEvents as decoded, then the SequenceResult (closing the iterator cancels)."""

    async def reload(self) -> ReloadSummary:
        """Load new versions from the repository beside the running ones (those they
        replace retire once the new ones serve)."""

    def models(self) -> list[ModelStatus]:
        """Every loaded version, by name then version."""

    def describe(self, name: str, version: int | None) -> ModelStatus:
        """One model version (latest when None); raises ModelNotFound."""

    def model_label(self, task: Task | None, name: str) -> str:
        """The metrics label for a requested model: its name if loaded, the task default
        for "", else a fixed placeholder (never the caller's string: label cardinality)."""

    def tasks(self) -> set[Task]:
        """Tasks with at least one loaded model (for per-service health)."""

    def missing(self) -> list[str]:
        """Models that must serve for the server to be ready ("" health) but do not."""

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop when a version stops serving on its own."""

    def broken(self) -> list[str]:
        """Versions whose engine failed for good: the process needs a restart."""

    def stop_loading(self) -> None:
        """A drain began: end any model load or reload now; the versions serving go on."""

    async def close(self) -> None:
        """Stop decoding loops and free sessions."""


# --- per-call plumbing --------------------------------------------------------------------


NO_REQUEST = "the call ended without a request message"


def _not_arrived(timeout: float) -> str:
    return (
        f"the request had not arrived {timeout:g} s after the server began reading it (the "
        "server's SERVE_REQUEST_READ_TIMEOUT_S, not the call's deadline)"
    )


def _grpc_read_limit(max_message_bytes: int) -> int:
    """What grpc reads of a request before refusing it itself: twice the server's own
    limit, so that a request over that one is read, and refused by the server, by name."""
    return min(2 * max_message_bytes, 2**31 - 1)


def _cut_short(max_message_bytes: int) -> str:
    return (
        "the call ended before its request arrived whole: the client went away while "
        f"sending it, or it was over the {_grpc_read_limit(max_message_bytes):,} bytes grpc "
        "reads (2 x SERVE_MAX_MESSAGE_BYTES), which grpc refused itself"
    )


def _shutting_down() -> Unavailable:
    return Unavailable("server is shutting down; retry on another replica", reason="draining")


class CallState:
    """What one call's handler reports back to the transport: the model label and, for
    inference calls, the version that answered and the tokens read and written (for the
    call's log line: during a reload it tells which version served the call). `peer`: the
    client's address as grpc gives it, to find a client that holds calls."""

    __slots__ = ("input_tokens", "model", "output_tokens", "peer", "request_id", "version")

    def __init__(self, request_id: str, peer: str) -> None:
        self.request_id = request_id
        self.peer = peer
        self.model = ""
        self.version: int | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def served(self, model: str, version: int) -> None:
        self.model, self.version = model, version

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens, self.output_tokens = input_tokens, output_tokens


class Transport:
    """Auth, drain refusal, request ids, deadlines, error mapping and metrics for every call."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        metrics.open_calls_limit.set(settings.max_calls)
        self.ready = False
        self.draining = False
        self.in_flight = 0  # calls past their request's read (what a drain waits for)
        self.calls = 0  # every call a handler holds, reading ones included
        self.answer_bytes = 0  # the held calls' answers, sent or not (SERVE_MAX_ANSWER_BYTES)
        self._read_turns = asyncio.Semaphore(settings.max_reading_calls)
        self._reading: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._reads_cut = False
        self._idle = asyncio.Event()
        self._idle.set()
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self._token = token.encode() if token else None
        self.max_message_bytes = settings.max_message_bytes

    # -- checks -----------------------------------------------------------------------

    def _metadata(self, context: grpc.aio.ServicerContext) -> dict[str, list[str]]:
        """Every value of each key, in the order sent: a key may come more than once, and
        a dict of one value each would keep only the last (a second `authorization`)."""
        metadata: dict[str, list[str]] = {}
        for k, v in context.invocation_metadata() or ():
            metadata.setdefault(str(k).lower(), []).append(
                v if isinstance(v, str) else v.decode("latin-1")
            )
        return metadata

    def request_id(self, metadata: dict[str, list[str]]) -> str:
        given = metadata.get(REQUEST_ID_KEY, [""])[-1]
        return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    def authenticate(self, metadata: dict[str, list[str]]) -> None:
        if self._token is None:
            return
        headers = metadata.get("authorization", [])
        if len(headers) > 1:
            raise Unauthenticated(
                f"{len(headers)} `authorization` metadata headers: exactly one "
                "`authorization: Bearer <token>` header is allowed"
            )
        header = headers[0] if headers else ""
        if not header:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization metadata must read `Bearer <token>`")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise Unauthenticated("invalid bearer token")

    def admit(self) -> None:
        if self.draining:
            raise _shutting_down()
        if not self.ready:
            raise Unavailable("models are loading; retry shortly", reason="loading")

    def fits(self, message: T, method: str) -> T:
        """`message`, if it is within the max message size: refused here, with the reason
        and what the caller of `method` can change, rather than by grpc after the call
        was counted as answered. Its size counts in `answer_bytes` until grpc is done with
        the call (`hold`)."""
        size = message.ByteSize()  # type: ignore[attr-defined]
        self.within(size, method)
        answers = _call_answers.get()
        if answers is not None:
            answers.size += size
            self.answer_bytes += size
        return message

    def within(self, size: int, method: str, part: str = "") -> None:
        """Refuse an answer of `size` bytes over the max message size; `part` says what
        share of the answer `size` counts, when it is a lower bound (refused early)."""
        if size > self.max_message_bytes:
            hint = _TOO_LARGE_HINTS.get(method, "the server's limit is too small for it")
            raise ResponseTooLarge(
                f"the answer is {'at least ' if part else ''}{size:,} bytes{part}, over the "
                f"server's max message size of {self.max_message_bytes:,} "
                f"(SERVE_MAX_MESSAGE_BYTES): {hint}",
                size_bytes=size,
                limit_bytes=self.max_message_bytes,
            )

    @staticmethod
    def deadline(context: grpc.aio.ServicerContext) -> float | None:
        """The call's gRPC deadline as a time.monotonic() instant (None without one)."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + max(0.0, remaining)

    # -- reading the request ------------------------------------------------------------

    def hold(self, context: grpc.aio.ServicerContext) -> None:
        """Count one call, and the bytes of its answers, from its start until grpc is done
        with it (SERVE_MAX_CALLS, inference_open_calls; SERVE_MAX_ANSWER_BYTES): past its
        handler's end too, while its answer and status wait for a caller that does not read
        them, which grpc holds until the connection closes."""
        self.calls += 1
        self.metrics.open_calls.inc()
        answers = _Answers()
        _call_answers.set(answers)
        context.add_done_callback(lambda _: self._released(answers))

    def _released(self, answers: _Answers) -> None:
        self.calls -= 1
        self.answer_bytes -= answers.size
        self.metrics.open_calls.dec()

    @staticmethod
    def began() -> None:
        """Mark the start of this call (its handler's task): what `_call` measures the RPC's
        duration from, so a wait for a read turn or for the request counts in it."""
        _call_began.set(time.monotonic())

    async def receive(self, context: grpc.aio.ServicerContext, method: str) -> Any:
        """The call's request, or an UnreadableRequest saying which bound it broke.

        grpc would read a whole request (up to 2 × max message size) before any check, and
        hold it as long as its sender takes: so credentials, the call count and the answers
        held are checked before a byte is read, at most max_reading_calls calls read at once,
        and a request must arrive within request_read_timeout_s."""
        try:
            self.authenticate(self._metadata(context))
            if self.calls > self.settings.max_calls:
                raise TooManyCalls(
                    f"the server holds {self.settings.max_calls:,} calls, its limit "
                    "(SERVE_MAX_CALLS); retry later or on another replica",
                    limit="max_calls",
                    max_calls=self.settings.max_calls,
                )
            if self.answer_bytes > self.settings.max_answer_bytes:
                raise TooManyCalls(
                    f"the server holds {self.answer_bytes:,} bytes of answers not yet "
                    f"delivered, over its limit of {self.settings.max_answer_bytes:,} "
                    "(SERVE_MAX_ANSWER_BYTES); retry later or on another replica",
                    limit="max_answer_bytes",
                    max_answer_bytes=self.settings.max_answer_bytes,
                )
            if self._reads_cut:
                raise _shutting_down()
            return await self._read(context, method)
        except ServiceError as error:
            return UnreadableRequest(error)

    async def _read(self, context: grpc.aio.ServicerContext, method: str) -> Any:
        task = asyncio.current_task()
        assert task is not None
        timeout = self.settings.request_read_timeout_s
        started, budget = _call_began.get() or time.monotonic(), context.time_remaining()
        turn = False
        self._reading.add(task)
        try:
            # The wait for a turn is bounded by the turns ahead (first come, first served,
            # each at most `timeout`), the call's deadline and the drain; the timeout runs
            # from the turn, so a request that arrived meanwhile is read, not refused.
            async with self._read_turns:
                turn = True
                async with asyncio.timeout(timeout):
                    request = await context.read()
        except TimeoutError:
            # A DEADLINE_EXCEEDED on which no work was spent (inference.proto, "Errors").
            raise RequestTimeout(_not_arrived(timeout), admitted="false") from None
        except asyncio.CancelledError:
            if task not in self._cut:  # grpc's: the deadline passed or the client went away
                self._unread(method, context, started, budget, turn)
                raise
            self._cut.discard(task)
            task.uncancel()
            raise _shutting_down() from None
        finally:
            self._reading.discard(task)
        if request is grpc.aio.EOF:
            # A connection that closed mid-request reads as EOF a moment before grpc
            # cancels the handler: give it that moment, so as not to count a client that
            # went away as one that sent nothing.
            try:
                await asyncio.sleep(EOF_GRACE_S)
            except asyncio.CancelledError:
                self._unread(method, context, started, budget, turn, cut=True)
                raise
            if context.cancelled():
                raise Cancelled("the client went away before its request arrived")
            raise InvalidArgument("request", NO_REQUEST)
        return request

    def _unread(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        started: float,
        budget: float | None,
        turn: bool,
        cut: bool = False,
    ) -> None:
        """Count and log a call grpc ended before its request was read (under model
        "unknown"): one whose deadline passed while it waited for a read turn is the
        server's deadline_exceeded (its read bounds made it wait), one whose deadline passed
        while its request was arriving is the caller's request_timeout. `cut`: its request
        had read as EOF, ended early: the client went away, or grpc refused it as over its
        own limit (what it told the client, RESOURCE_EXHAUSTED, the handler cannot see)."""
        code, message, reason = self._cancel_status(context, budget)
        if cut and code != grpc.StatusCode.DEADLINE_EXCEEDED:
            code, message, reason = status_of(RequestCut(_cut_short(self.max_message_bytes)))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if turn:
                message = "the deadline passed before the request arrived"
                reason = RequestTimeout.reason
            else:
                message = "the deadline passed while the call waited for a read turn"
        state = CallState(self.request_id(self._metadata(context)), context.peer())
        self._finish(method, state, code, started, message, reason)

    def cut_reads(self) -> None:
        """End of a drain: calls still reading their request are refused UNAVAILABLE (as
        they would be once read), so a stalled sender does not hold the stop."""
        self._reads_cut = True
        for task in self._reading:
            self._cut.add(task)
            task.cancel()

    # -- accounting -------------------------------------------------------------------

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when no call is in flight, False if `timeout` passed first."""
        if self._idle.is_set():  # wait_for(…, 0) times out before it looks (Python 3.11)
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _finish(
        self,
        method: str,
        state: CallState,
        code: grpc.StatusCode,
        started: float,
        error: str,
        reason: str | None,
    ) -> None:
        seconds = time.monotonic() - started
        label = state.model or UNKNOWN_MODEL_LABEL
        extra: dict[str, object] = {
            "request_id": state.request_id,  # also for calls refused before _call set it
            "method": method,
            "model": label,
            "code": code_name(code),
            "duration_ms": round(seconds * 1000, 2),
            "peer": state.peer,
        }
        if reason is not None:
            extra["reason"] = reason
        for key in ("version", "input_tokens", "output_tokens"):
            if getattr(state, key) is not None:
                extra[key] = getattr(state, key)
        if code == grpc.StatusCode.INTERNAL:
            log.error("call failed: %s", error, extra=extra)
        elif code == grpc.StatusCode.OK:
            log.info("call finished", extra=extra)
        elif code == grpc.StatusCode.CANCELLED:  # the client's doing (or grpc's, cut short)
            log.info("call cancelled: %s", error, extra={**extra, "error": error})
        else:  # the server's own refusals (overload, drain, deadline) warn; bad calls inform
            level = logging.INFO if reason in CLIENT_SIDE_REASONS else logging.WARNING
            log.log(level, "call refused: %s", error, extra={**extra, "error": error})
        # Counted after its log line: whoever sees the count can find the line.
        self.metrics.observe_request(method, label, code_name(code), seconds, reason)

    @staticmethod
    def _cancel_status(
        context: grpc.aio.ServicerContext, budget: float | None
    ) -> tuple[grpc.StatusCode, str, str]:
        """Why grpc cancelled the handler: the deadline passed, or the client went away.
        The server's copy of a deadline ends later than the client's by the time the call
        took to arrive (long in a burst), so a cancellation that close to it is the client's
        deadline (within DEADLINE_SLACK of the `budget` the call arrived with, bounded by
        DEADLINE_SLACK_S: with a minute's deadline, a client's own cancel 2 s before it
        is a cancel)."""
        remaining = context.time_remaining()
        low, high = DEADLINE_SLACK_S
        near = None if budget is None else min(high, max(low, DEADLINE_SLACK * budget))
        if remaining is not None and near is not None and remaining <= near:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", DeadlineExceeded.reason
        return grpc.StatusCode.CANCELLED, "cancelled by the client", Cancelled.reason

    # -- wrappers ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        public: bool = False,
        model: str = "",
    ) -> AsyncIterator[CallState]:
        """Request id, drain refusal, metrics and logs around one call (credentials were
        checked before its request was read: `receive`); a domain error (or grpc's
        cancellation) in the body ends the call with its mapped status. `model`: the
        call's model label, known before the drain check so that its refusals count under
        it (else the handler sets it)."""
        metadata = self._metadata(context)
        state = CallState(self.request_id(metadata), context.peer())
        state.model = model
        token = request_id_var.set(state.request_id)
        trailer = ((REQUEST_ID_KEY, state.request_id),)
        context.set_trailing_metadata(trailer)
        # From the call's start (`began`), not from its request's read: the client's wait
        # for a read turn and its upload are part of the RPC it sees.
        started = _call_began.get() or time.monotonic()
        budget = context.time_remaining()
        self._enter()
        code, message, reason = grpc.StatusCode.OK, "", None
        error: Exception | None = None
        try:
            if not public:
                self.admit()
            yield state
            return
        except (asyncio.CancelledError, GeneratorExit):
            code, message, reason = self._cancel_status(context, budget)
            raise
        except Exception as exc:
            error = exc
            code, message, reason = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected error in %s", method)
        finally:
            self._finish(method, state, code, started, message, reason)
            self._leave()
            request_id_var.reset(token)
        sent = sent_message(message)
        details = rich_status(code, sent, reason, error).SerializeToString()
        try:
            await context.abort(code, sent, trailing_metadata=(*trailer, (DETAILS_KEY, details)))
        except grpc.aio.AbortError:
            raise  # how an abort ends the handler
        except Exception:
            # The client went away before the status could go out (grpc's
            # ExecuteBatchError): as after a failed write (_write_all), wait for grpc to
            # cancel this task rather than have it log the failure as an ERROR.
            await asyncio.sleep(WRITE_FAILURE_GRACE_S)
            raise

    async def unary(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[CallState], Awaitable[T]],
        public: bool = False,
        model: str = "",
    ) -> T:
        """Run a unary handler with the shared plumbing; abort with the mapped status. An
        answer ready once the call's deadline has passed is not sent (`_in_time`)."""
        async with self._call(method, context, public, model) as state:
            answer = await handler(state)
            self._in_time(context, "the answer was being made: not sent")
            return self.fits(answer, method)
        raise AssertionError("unreachable: a failed call aborts")

    @staticmethod
    def _in_time(context: grpc.aio.ServicerContext, what: str) -> None:
        """DeadlineExceeded if the call's deadline has passed: its client has had
        DEADLINE_EXCEEDED (or would, at random, as grpc races the status against the
        deadline), so the call is counted so, not as OK."""
        left = context.time_remaining()
        if left is not None and left <= 0:  # grpc's time left stops at 0
            raise DeadlineExceeded(f"the deadline passed while {what}", admitted="true")

    async def stream(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[CallState], AsyncGenerator[T]],
        model: str = "",
    ) -> AsyncGenerator[T]:
        """Run a streaming handler with the shared plumbing."""
        async with (
            self._call(method, context, model=model) as state,
            contextlib.aclosing(handler(state)) as items,
        ):
            async for item in items:
                yield self.fits(item, method)
            self._in_time(context, "the stream was being sent")


# --- protobuf ↔ domain --------------------------------------------------------------------


def hypothesis_pb(h: HypothesisResult, scores: bool, alignment: bool) -> pb.Hypothesis:
    message = pb.Hypothesis(
        text=h.text,
        output_tokens=len(h.token_ids),
        finish_reason=FINISH_REASON_PB.get(h.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
    )
    if scores:
        message.score = h.score
        message.normalized_score = h.normalized_score
    if alignment:
        message.tokens.extend(h.tokens)
        for row in h.alignment or ():
            message.alignment.add(weights=row)
    return message


def translation_pb(result: SequenceResult, params: DecodingParams) -> pb.Translation:
    translation = pb.Translation(
        input_tokens=result.input_tokens,
        hypotheses=[
            hypothesis_pb(h, params.return_scores, params.return_alignment)
            for h in result.hypotheses
        ],
    )
    if params.return_alignment:
        translation.source_tokens.extend(result.source_tokens)
    return translation


def model_info_pb(status: ModelStatus, settings: Settings) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=status.name,
        version=status.version,
        task=status.task.value,
        source_language=status.source_language,
        target_language=status.target_language,
        dtype=status.dtype,
        provider=status.provider,
        limits=pb.Limits(
            max_input_tokens=min(status.max_input_tokens, settings.max_input_tokens),
            max_new_tokens=min(status.max_new_tokens, settings.max_new_tokens),
            max_texts_per_request=settings.max_texts_per_request,
            max_beam_size=settings.max_beam_size,
            max_positions=status.max_positions,
            max_batch_tokens=settings.max_batch_tokens,
        ),
        versions=list(status.versions),
        ready=status.ready,
        config_json=json.dumps(status.config, sort_keys=True),
    )


def _rename_text_field(exc: InvalidArgument, field_name: str) -> InvalidArgument:
    """An engine's complaint about "text" becomes one about the caller's field (texts[2])."""
    if exc.field not in ("text", "texts", "prompt", "input", ""):
        return exc
    return InvalidArgument(field_name, exc.description)


async def _write_all(context: grpc.aio.ServicerContext, items: AsyncGenerator[Any]) -> None:
    """Send a server stream with `context.write`, closing `items` in this call's task.

    The stream servicers are coroutines, not async generators: when a client cancels
    while a message is being written, grpc.aio abandons an async-generator handler
    suspended at its `yield`, and the event loop's finalizer closes it later, in another
    task and contextvars Context, where `Transport.stream` failed to reset the request id
    (ValueError, "Task exception was never retrieved": an ERROR log). Here the
    cancellation is raised at `await context.write` and `aclosing` unwinds
    `Transport.stream` at once, in the call's own task, which also frees the rows.

    A write also fails (grpc's ExecuteBatchError) when the client went away while it was
    pending. The stream is closed at once (its row leaves the batch at the next step and
    the call is counted CANCELLED); grpc.aio learns of the cancellation a moment later and
    cancels this task. Waiting for that keeps grpc from logging the failed write as an
    ERROR; a failure that is not a cancellation still propagates.
    """
    async with contextlib.aclosing(items) as stream:
        async for item in stream:
            try:
                await context.write(item)
            except Exception:
                await stream.aclose()
                await asyncio.sleep(WRITE_FAILURE_GRACE_S)
                raise


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T]]:
    """Close an async generator when the call ends early, so the scheduler drops the row."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


# --- servicers ----------------------------------------------------------------------------


class _Servicer:
    def __init__(self, backend: Backend, transport: Transport, settings: Settings) -> None:
        self.backend = backend
        self.transport = transport
        self.settings = settings
        self.limits = validation.RequestLimits.from_settings(settings)

    def _request(
        self,
        task: Task,
        text: str,
        params: Any,
        model: str,
        version: int,
        state: CallState,
        context: grpc.aio.ServicerContext,
    ) -> SequenceRequest:
        return SequenceRequest(
            task=task,
            text=text,
            params=params,
            model=validation.model_name("model", model),
            version=validation.version(version),
            request_id=state.request_id,
            deadline=self.transport.deadline(context),
        )

    async def _serve_stream(
        self,
        method: str,
        task: Task,
        field_name: str,
        text: str,
        request: pb.TranslateStreamRequest | pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """The one shape of both streaming RPCs: validate, submit, send chunks as decoded."""

        async def handle(state: CallState) -> AsyncGenerator[pb.TokenChunk]:
            checked = validation.text(field_name, text, self.limits)
            params = validation.decoding_params(request.options, self.limits, task, stream=True)
            seq = self._request(
                task, checked, params, request.model, request.version, state, context
            )
            async for chunk in self._stream_chunks(seq, state, field_name):
                yield chunk

        label = self.backend.model_label(task, request.model)
        await _write_all(context, self.transport.stream(method, context, handle, label))

    async def _stream_chunks(
        self, request: SequenceRequest, state: CallState, field_name: str
    ) -> AsyncGenerator[pb.TokenChunk]:
        """TokenEvents → TokenChunks; the last chunk carries finish reason, usage, score,
        and whatever of the answer the events did not send (an answer cut short by a
        cancellation or the drain has not been through the engine's last event)."""
        sent, sent_ids = "", []
        try:
            async with _closing(self.backend.stream(request)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        sent += event.text
                        sent_ids += event.token_ids
                        # Counted as they go out: the log line of a stream cut short.
                        state.output_tokens = (state.output_tokens or 0) + len(event.token_ids)
                        yield pb.TokenChunk(text=event.text, token_ids=event.token_ids)
                        continue
                    result = event
                    state.served(result.model, result.version)
                    best = result.hypotheses[0]
                    state.usage(result.input_tokens, len(best.token_ids))
                    ids = best.token_ids
                    chunk = pb.TokenChunk(
                        # Anything the events did not send yet (e.g. held back for stop).
                        text=best.text[len(sent) :] if best.text.startswith(sent) else "",
                        token_ids=ids[len(sent_ids) :] if ids[: len(sent_ids)] == sent_ids else [],
                        finished=True,
                        finish_reason=FINISH_REASON_PB.get(
                            best.finish_reason, pb.FINISH_REASON_UNSPECIFIED
                        ),
                        usage=pb.Usage(
                            input_tokens=result.input_tokens,
                            output_tokens=len(best.token_ids),
                        ),
                        model=result.model,
                        version=result.version,
                    )
                    if request.params.return_scores:
                        chunk.score = best.score
                    if request.params.return_alignment:
                        for row in best.alignment or ():
                            chunk.alignment.add(weights=row)
                        chunk.source_tokens.extend(result.source_tokens)
                        chunk.tokens.extend(best.tokens)
                    yield chunk
                    return
        except InvalidArgument as exc:
            raise _rename_text_field(exc, field_name) from None


class TranslatorServicer(_Servicer, pb_grpc.TranslatorServicer):
    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        async def handle(state: CallState) -> pb.TranslateResponse:
            texts = validation.texts(request.texts, self.limits)
            params = validation.decoding_params(request.options, self.limits, Task.TRANSLATION)
            requests = [
                self._request(
                    Task.TRANSLATION, t, params, request.model, request.version, state, context
                )
                for t in texts
            ]
            built: dict[int, pb.Translation] = {}
            size = 0

            def collect(i: int, result: SequenceResult) -> None:
                """Each text's answer as it comes: once those decoded are over the max
                message size, the call is refused and the texts left are cancelled (the
                whole answer's exact size is checked once every text is in)."""
                nonlocal size
                built[i] = translation_pb(result, params)
                size += built[i].ByteSize()
                if len(built) < len(requests):
                    part = f" with {len(built)} of {len(requests)} texts decoded"
                    self.transport.within(size, "Translate", part)

            results = await _gather_texts(self.backend, requests, collect)
            response = pb.TranslateResponse(model=results[0].model, version=results[0].version)
            state.served(results[0].model, results[0].version)
            response.translations.extend(built[i] for i in range(len(results)))
            usage_in = usage_out = 0
            for result in results:
                usage_in += result.input_tokens
                usage_out += result.output_tokens
            response.usage.input_tokens = usage_in
            response.usage.output_tokens = usage_out
            state.usage(usage_in, usage_out)
            return response

        label = self.backend.model_label(Task.TRANSLATION, request.model)
        return await self.transport.unary("Translate", context, handle, model=label)

    async def TranslateStream(
        self, request: pb.TranslateStreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve_stream(
            "TranslateStream", Task.TRANSLATION, "text", request.text, request, context
        )


async def _gather_texts(
    backend: Backend,
    requests: Sequence[SequenceRequest],
    check: Callable[[int, SequenceResult], None],
) -> list[SequenceResult]:
    """Submit a call's texts together (all queued or none); a refusal names texts[i]."""
    try:
        return await backend.submit_all(requests, check)
    except InvalidArgument as exc:
        if exc.index is None:
            raise
        raise _rename_text_field(exc, f"texts[{exc.index}]") from None


class GeneratorServicer(_Servicer, pb_grpc.GeneratorServicer):
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve_stream(
            "Generate", Task.GENERATION, "prompt", request.prompt, request, context
        )

    async def GenerateUnary(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async def handle(state: CallState) -> pb.GenerateResponse:
            prompt = validation.text("prompt", request.prompt, self.limits)
            params = validation.decoding_params(request.options, self.limits, Task.GENERATION)
            seq = self._request(
                Task.GENERATION, prompt, params, request.model, request.version, state, context
            )
            try:
                result = await self.backend.submit(seq)
            except InvalidArgument as exc:
                raise _rename_text_field(exc, "prompt") from None
            state.served(result.model, result.version)
            state.usage(result.input_tokens, result.output_tokens)
            return pb.GenerateResponse(
                model=result.model,
                version=result.version,
                hypotheses=[
                    hypothesis_pb(h, params.return_scores, False) for h in result.hypotheses
                ],
                usage=pb.Usage(
                    input_tokens=result.input_tokens, output_tokens=result.output_tokens
                ),
            )

        label = self.backend.model_label(Task.GENERATION, request.model)
        return await self.transport.unary("GenerateUnary", context, handle, model=label)


class ModelsServicer(_Servicer, pb_grpc.ModelsServicer):
    def __init__(
        self,
        backend: Backend,
        transport: Transport,
        settings: Settings,
        reload: Callable[[], Awaitable[ReloadSummary]],
    ) -> None:
        super().__init__(backend, transport, settings)
        self._reload = reload

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def handle(state: CallState) -> pb.ListModelsResponse:
            state.model = "all"
            return pb.ListModelsResponse(
                models=[model_info_pb(m, self.settings) for m in self.backend.models()]
            )

        return await self.transport.unary("ListModels", context, handle, public=True)

    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        async def handle(state: CallState) -> pb.ModelInfo:
            state.model = self.backend.model_label(None, request.name)
            if not request.name:
                raise InvalidArgument("name", "is empty; give a model name (see ListModels)")
            name = validation.model_name("name", request.name)
            status = self.backend.describe(name, validation.version(request.version))
            return model_info_pb(status, self.settings)

        return await self.transport.unary("DescribeModel", context, handle, public=True)

    async def Reload(
        self, request: pb.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadResponse:
        async def handle(state: CallState) -> pb.ReloadResponse:
            state.model = "all"
            if self.transport.draining:
                raise Unavailable("server is shutting down; reload refused", reason="draining")
            summary = await self._reload()
            return pb.ReloadResponse(
                loaded=summary.loaded, retired=summary.retired, failed=summary.failed
            )

        return await self.transport.unary("Reload", context, handle, public=True)


# --- server assembly and lifecycle --------------------------------------------------------


class UnreadableRequest:
    """What a request that cannot be read deserializes to (not valid protobuf, or over the
    max message size), so that its call is answered, counted and logged like any other,
    instead of grpc answering (UNKNOWN, RESOURCE_EXHAUSTED) before the transport sees it."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error

    async def refuse(self, state: CallState) -> Any:
        raise self.error


# Why bytes that reached a handler may not decode as its request message.
_UNDECODABLE = "(a string that is not UTF-8, or bytes of another message)"


def _lenient(message: Any, max_bytes: int) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            return UnreadableRequest(
                RequestTooLarge(
                    f"the request is {len(data):,} bytes, over the server's max message size "
                    f"of {max_bytes:,} (SERVE_MAX_MESSAGE_BYTES): send fewer or shorter texts",
                    size_bytes=len(data),
                    limit_bytes=max_bytes,
                )
            )
        try:
            return message.FromString(data)
        except DecodeError as error:
            return UnreadableRequest(
                InvalidArgument(
                    "request",
                    f"not a valid {message.DESCRIPTOR.full_name} {_UNDECODABLE}: {error}",
                )
            )

    return deserialize


def _checked(servicer: _Servicer, name: str) -> Callable[..., Awaitable[Any]]:
    """The handler of method `name`: registered as request-streaming so that it runs
    before the request is read, and reads it itself (Transport.receive)."""
    behavior = getattr(servicer, name)
    transport = servicer.transport

    async def handler(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        transport.began()
        transport.hold(context)
        request = await transport.receive(context, name)
        if isinstance(request, UnreadableRequest):
            return await transport.unary(name, context, request.refuse, public=True)
        return await behavior(request, context)

    return handler


def add_servicer(server: grpc.aio.Server, service: str, servicer: _Servicer) -> None:
    """Register `servicer` for `service` of inference.proto, as the generated
    add_*Servicer_to_server does, but with each request read by the transport under its
    bounds, and one that fails to parse answered by it (UnreadableRequest). Clients still
    see unary requests: only the server's reading of them differs."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.server_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _checked(servicer, method.name),
            request_deserializer=_lenient(
                getattr(pb, method.input_type.name), servicer.transport.max_message_bytes
            ),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)


# Health and reflection requests are read under bounds of their own (PublicReads).
PUBLIC_READ_TURNS = 4
PUBLIC_MAX_READING = 256
PUBLIC_MAX_STREAMS = 1024
PUBLIC_MAX_CALLS = 1024


class PublicReads(grpc.aio.ServerInterceptor):
    """Bounds on reading the requests of the open services (health, reflection).

    grpc reads a unary request whole (up to grpc.max_receive_message_length) before the
    handler runs, for as long as its sender takes, and these calls need no token and are
    not counted in SERVE_MAX_CALLS: without this, any client that reaches the port can
    make the server buffer 2 x max message size per call, in any number, until it runs
    out of memory. Their handlers are made request-streaming, as the inference methods
    are (add_servicer), and read each request here: at most PUBLIC_READ_TURNS at once (and
    as many messages of request streams), each within SERVE_REQUEST_READ_TIMEOUT_S of its
    turn, and at most PUBLIC_MAX_READING calls reading or waiting to (each of those holds
    one 64 KiB window). Their turns are not the inference calls' (Transport), so stalled
    callers of one do not starve the other.
    Streams (Health.Watch, reflection) live as long as their caller likes: at most
    PUBLIC_MAX_STREAMS are open at once, as grpc bounds no number of streams. A unary
    call's answer is held by grpc until its caller reads it, or the connection closes: at
    most PUBLIC_MAX_CALLS unary calls are open at once, from their start until grpc is done
    with them. Each port's server has its own PublicReads, so a flood of the main port's
    does not fail the probes of the health port."""

    def __init__(self, read_timeout_s: float) -> None:
        self._timeout = read_timeout_s
        self._turns = asyncio.Semaphore(PUBLIC_READ_TURNS)
        # Request streams (reflection) wait for their next message holding a turn: theirs
        # are apart, so idle reflection clients cannot hold up health checks (probes).
        self._stream_turns = asyncio.Semaphore(PUBLIC_READ_TURNS)
        self.reading = 0  # calls sending their request, or waiting for a turn to
        self.streams = 0  # streams open (until grpc is done with them)
        self.calls = 0  # unary calls open (until grpc is done with them)

    async def _read(
        self, context: grpc.aio.ServicerContext, turns: asyncio.Semaphore | None = None
    ) -> Any:
        if self.reading >= PUBLIC_MAX_READING:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{PUBLIC_MAX_READING} health or reflection calls are sending their "
                "requests; retry later",
            )
        self.reading += 1
        try:
            async with turns or self._turns, asyncio.timeout(self._timeout):
                return await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _not_arrived(self._timeout))
        except DecodeError as error:
            # grpc would answer UNKNOWN and log the traceback at ERROR, for any caller: bad
            # input, as the inference methods answer it (`_lenient`).
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not valid protobuf {_UNDECODABLE}: {error}",
            )
        finally:
            self.reading -= 1

    async def _one(self, context: grpc.aio.ServicerContext) -> Any:
        request = await self._read(context)
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
        return request

    async def _hold(self, context: grpc.aio.ServicerContext, stream: bool) -> None:
        """Count the call until grpc is done with it; refuse one over its kind's bound."""
        kind, limit = ("streams", PUBLIC_MAX_STREAMS) if stream else ("calls", PUBLIC_MAX_CALLS)
        if (self.streams if stream else self.calls) >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{limit} health or reflection {kind} are open; retry later",
            )
        if stream:
            self.streams += 1
        else:
            self.calls += 1
        context.add_done_callback(lambda _: self._release(stream))

    def _release(self, stream: bool) -> None:
        if stream:
            self.streams -= 1
        else:
            self.calls -= 1

    @staticmethod
    async def _answer(result: Any, context: grpc.aio.ServicerContext) -> Any:
        """Run a handler's result: write out a generator's messages, or await the answer."""
        if inspect.isasyncgen(result):
            async for response in result:
                await context.write(response)
            return None
        return await result

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = (details.method or "").lstrip("/").partition("/")[0]
        if handler is None or service in SERVICE_NAMES.values():
            return handler  # the inference methods read under Transport's bounds
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        codec = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.request_streaming:
            inner = handler.stream_stream or handler.stream_unary

            async def requests(context: grpc.aio.ServicerContext) -> AsyncGenerator[Any]:
                while (
                    request := await self._read(context, self._stream_turns)
                ) is not grpc.aio.EOF:
                    yield request

            async def streamed(_: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._hold(context, stream=True)
                return await self._answer(inner(requests(context), context), context)

            return make(streamed, **codec)
        inner = handler.unary_stream or handler.unary_unary

        async def unary(_: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._hold(context, handler.response_streaming)
            return await self._answer(inner(await self._one(context), context), context)

        return make(unary, **codec)


# grpc's own default bound on the calls it holds before the event loop takes them.
PENDING_CALLS = 1000

# Descriptors the server needs besides its connections (models, logs, listeners, threads).
OWN_FILES = 256


def check_open_files(max_connections: int, ports: int) -> None:
    """Warn when the open-file limit is below what max_connections lets clients open: the
    connections would take the last descriptors, and every accept then fails."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections * ports + OWN_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "the open-file limit (%d) is below what max_connections lets clients open "
            "(%d on %d port(s), plus about %d of the server's own): lower "
            "SERVE_MAX_CONNECTIONS or raise the limit (ulimit -n)",
            soft,
            max_connections,
            ports,
            OWN_FILES,
        )


def connection_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments of both ports' servers: no port sharing, bounded connections, and
    each connection closed at its max age (so answers a caller never reads, which grpc
    holds until then, are let go on the health port too)."""
    options: list[tuple[str, Any]] = [
        # Refuse to share the port with another process (a stale server must not steal
        # half the connections).
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # Fixed 64 KiB stream windows: what a call waiting for a read turn can have sent
        # is held unread, and BDP probing grows those windows to megabytes.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments of the gRPC port's server: message sizes, calls grpc may hold
    before the event loop takes them, and the connection options."""
    return [
        # grpc reads requests up to twice the limit, so that the transport refuses one over
        # it (named, counted and logged: `_lenient`); beyond that grpc refuses it itself.
        ("grpc.max_receive_message_length", _grpc_read_limit(settings.max_message_bytes)),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Calls grpc holds before the event loop takes them: past 1000 (its default) it
        # cancels some at random, past 3000 all, uncounted and as a bare CANCELLED that
        # reads as the client's own. Past max_calls the server refuses them itself, counted
        # and saying why (too_many_calls), so grpc's shedding starts only beyond that.
        ("grpc.server.max_pending_requests", max(PENDING_CALLS, settings.max_calls)),
        (
            "grpc.server.max_pending_requests_hard_limit",
            max(3 * PENDING_CALLS, 2 * settings.max_calls),
        ),
        *connection_options(settings),
    ]


def can_listen(host: str, port: int) -> bool:
    """Whether a listener could take host:port now (with SO_REUSEADDR, as grpc's), to tell
    a bind that failed on the port or the address from one grpc refused for its TLS files."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError:
                return False
    return True


class InferenceServer:
    """The gRPC server with its health, reflection, metrics endpoint and backend."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.transport = Transport(settings, metrics)
        self.health = Health()
        timeout = settings.request_read_timeout_s
        self.public_reads = PublicReads(timeout)
        self.server = grpc.aio.server(
            options=server_options(settings), interceptors=[self.public_reads]
        )
        # Health alone, in plaintext, for the probes: the kubelet speaks no TLS, and clients
        # (kept off it by the NetworkPolicy) cannot take its read turns and call bounds.
        self.health_reads = PublicReads(timeout)
        self.health_server = (
            grpc.aio.server(options=connection_options(settings), interceptors=[self.health_reads])
            if settings.health_port
            else None
        )
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._metrics_server: MetricsServer | None = None
        self._reload_lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._drain_failed = False
        self._drain_task: asyncio.Task[None] | None = None
        self._health_updates: set[asyncio.Task[None]] = set()  # strong references
        self._reloads: set[asyncio.Task[ReloadSummary]] = set()  # strong references
        self._signalled_reload: asyncio.Task[ReloadSummary] | None = None  # not yet begun
        backend.watch(self._serving_changed)

        add_servicer(
            self.server, "Translator", TranslatorServicer(backend, self.transport, settings)
        )
        add_servicer(self.server, "Generator", GeneratorServicer(backend, self.transport, settings))
        add_servicer(
            self.server, "Models", ModelsServicer(backend, self.transport, settings, self.reload)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.health_server is not None:  # with reflection, so grpcurl needs no proto
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            reflection.enable_server_reflection(
                [
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                self.health_server,
            )
        reflection.enable_server_reflection(
            [
                *SERVICE_NAMES.values(),
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )

    def _serving_changed(self) -> None:
        """A version stopped serving on its own (its engine failed): health follows."""
        task = asyncio.get_running_loop().create_task(self._set_health())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.transport.ready and not self.transport.draining
        tasks = self.backend.tasks() if ready else set()
        per_service = {
            SERVICE_NAMES["translator"]: Task.TRANSLATION in tasks,
            SERVICE_NAMES["generator"]: Task.GENERATION in tasks,
            # The liveness probe's: a failed engine needs a new process.
            SERVICE_NAMES["models"]: ready and not self.backend.broken(),
        }
        for name, ok in per_service.items():
            await self.health.set(name, serving if ok else not_serving)
        missing = self.backend.missing() if ready else []
        if missing:
            log.warning(
                "not ready: no version of %s serves (model_ready and the reload's log say "
                "why); the other services' health is per service",
                ", ".join(missing),
            )
        await self.health.set("", serving if ready and tasks and not missing else not_serving)

    def _bind(self) -> int:
        address = self.settings.address(self.settings.port)
        cert, key = self.settings.tls_cert, self.settings.tls_key
        client_ca = self.settings.tls_client_ca
        try:
            if cert is not None and key is not None:
                # With a client CA, mutual TLS: a client must present a certificate it issued.
                credentials = grpc.ssl_server_credentials(
                    [(key.read_bytes(), cert.read_bytes())],
                    root_certificates=client_ca.read_bytes() if client_ca else None,
                    require_client_auth=client_ca is not None,
                )
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where older releases returned 0
            port = 0
        if port == 0 and cert is not None and can_listen(self.settings.host, self.settings.port):
            # The settings' check reads the files with Python's OpenSSL, which takes keys
            # that grpc's BoringSSL does not (brainpool or secp256k1 curves, explicit curve
            # parameters, Ed448, RSA-PSS, DSA): grpc then fails the bind as it does a port
            # in use.
            raise StartupError(
                f"grpc cannot serve tls_cert {cert} with tls_key {key}: its TLS library, "
                "BoringSSL, takes RSA keys (not RSA-PSS), ECDSA keys on the named curves "
                "P-256, P-384 or P-521, and Ed25519 keys; issue a certificate for one of "
                f"those (--tls-cert / {ENV_PREFIX}TLS_CERT, --tls-key / {ENV_PREFIX}TLS_KEY)"
            )
        if port == 0:
            raise StartupError(
                f"cannot listen for gRPC on {address}: the port is in use or the address is "
                f"not this machine's; choose another with --port / {ENV_PREFIX}PORT or "
                f"--host / {ENV_PREFIX}HOST"
            )
        return port

    def _bind_health(self) -> None:
        if self.health_server is None:
            return
        address = self.settings.address(self.settings.health_port)
        try:
            self.health_port = self.health_server.add_insecure_port(address)
        except RuntimeError:
            self.health_port = 0
        if self.health_port == 0:
            raise StartupError(
                f"cannot listen for health checks on {address}: the port is in use; choose "
                f"another with --health-port / {ENV_PREFIX}HEALTH_PORT (0 = none)"
            )

    def _start_metrics(self) -> None:
        if self.settings.metrics_port == 0:
            return
        try:
            self._metrics_server = MetricsServer(
                self.settings.host,
                self.settings.metrics_port,
                self.metrics.registry,
                max_connections=METRICS_MAX_CONNECTIONS,
                read_timeout_s=METRICS_READ_TIMEOUT_S,
                connection_s=METRICS_CONNECTION_S,
            )
        except OSError as error:
            raise StartupError(
                f"cannot serve metrics on {self.settings.address(self.settings.metrics_port)}: "
                f"{error.strerror}; choose another with --metrics-port / "
                f"{ENV_PREFIX}METRICS_PORT (0 turns the endpoint off)"
            ) from error
        self.metrics_port = int(self._metrics_server.server_port)

    async def start(self) -> None:
        """Bind (health NOT_SERVING), load and warm the models, then SERVING."""
        await self._set_health()
        if self.settings.tls_cert is not None:
            self.metrics.tls_certificate_expiry.value = check_served_certificate(
                self.settings.tls_cert, datetime.now(UTC)
            )
        if self.settings.tls_key is not None:
            check_key_permissions(self.settings.tls_key)
        self.port = self._bind()
        self._bind_health()
        self._start_metrics()
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        log.info(
            "listening",
            extra={
                "address": self.settings.address(self.port),
                "tls": self.settings.tls,
                "mtls": self.settings.mtls,
                "auth": self.settings.auth_token is not None,
                "metrics_port": self.metrics_port,
                "health_port": self.health_port,
            },
        )
        if self.settings.auth_token is not None and not self.settings.tls:
            log.warning(
                "the bearer token travels unencrypted: set --tls-cert and --tls-key, or keep "
                "the port behind a proxy or mesh that terminates TLS"
            )
        check_open_files(self.settings.max_connections, 2 if self.health_server else 1)
        started = time.monotonic()
        await self.backend.start()
        if self.transport.draining:  # SIGTERM while the models loaded: the drain ends it
            log.info("stopped before serving: a stop signal came while the models loaded")
            return
        self.transport.ready = True
        await self._set_health()
        log.info(
            "serving",
            extra={
                "models": [f"{m.name}:{m.version}" for m in self.backend.models()],
                "load_s": round(time.monotonic() - started, 3),
            },
        )

    async def reload(self) -> ReloadSummary:
        """Load new versions beside the running ones, retiring those they replace (one
        reload at a time). The reload runs to its end even when its caller is cancelled (a
        Reload call past its deadline, or whose client went away): cut between loading a
        version and starting it, that version would stay listed but never serve, and the
        next reload would retire the one it replaces."""
        return await asyncio.shield(self.start_reload())

    def start_reload(self) -> asyncio.Task[ReloadSummary]:
        """Start a reload that no caller can cut short (SIGHUP's, or one `reload` awaits)."""
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reload_ended)
        return task

    def on_reload_signal(self) -> None:
        """SIGHUP: reload, unless a SIGHUP's reload still waits for its turn: it scans the
        repository after this signal anyway, so a burst of signals runs one reload, not one
        each."""
        if self.transport.draining:
            log.info("reload signal ignored: the server is draining")
        elif self._signalled_reload is not None:
            log.info("reload signal joins the reload waiting for its turn")
        else:
            self._signalled_reload = self.start_reload()  # it logs its own failure

    def _reload_ended(self, task: asyncio.Task[ReloadSummary]) -> None:
        """Log a failed reload here, where it is seen whether or not its caller still waits."""
        self._reloads.discard(task)
        if task is self._signalled_reload:  # cancelled before its turn
            self._signalled_reload = None
        if not task.cancelled() and (error := task.exception()) is not None:
            if isinstance(error, Unavailable) and error.reason == "draining":
                # A SIGHUP queued behind another reload when SIGTERM came: ignored, as one
                # that comes during the drain is (on_reload_signal), not a failure of a clean stop.
                log.info("reload not run: the server is draining")
                return
            log.error("reload failed: %s", error, exc_info=error)

    async def _reload(self) -> ReloadSummary:
        async with self._reload_lock:
            if asyncio.current_task() is self._signalled_reload:
                self._signalled_reload = None  # it scans from now: a new signal needs another
            summary = await self.backend.reload()
            await self._set_health()
            log.info(
                "reloaded",
                extra={
                    "loaded": summary.loaded,
                    "retired": summary.retired,
                    "failed": summary.failed,
                },
            )
            return summary

    def request_drain(self) -> None:
        """Signal-safe: start draining once (SIGTERM, SIGINT)."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Stop gracefully (`_drain`); whatever happens there, the process then ends, with
        exit code 1 if the drain failed, rather than hanging until the kubelet's SIGKILL."""
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed; stopping now")
            self._drain_failed = True
            await self._stop_now()
        finally:
            self._stopped.set()

    async def _stop_now(self) -> None:
        """After a failed drain: close what is still open, each step whatever the others do."""
        with contextlib.suppress(Exception):
            await self.close_ports()
        with contextlib.suppress(Exception):
            await self.backend.close()
        with contextlib.suppress(Exception):
            self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    async def _drain(self) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish (≤ drain_grace_s), stop."""
        grace = self.settings.drain_grace_s
        started = time.monotonic()
        log.info("draining", extra={"in_flight": self.transport.in_flight, "grace_s": grace})
        self.transport.draining = True
        self.backend.stop_loading()
        await self.health.enter_graceful_shutdown()
        if not self.transport.ready:
            # The models still load (start() runs) and no inference call was admitted:
            # stop the backend now, so that a warm-up ends at its next shape instead of
            # going on through the linger (or the grace, for a Reload call waiting on it).
            await self.backend.close()
        finished = await self.transport.wait_idle(grace)
        if not finished:
            log.warning(
                "drain grace over; cancelling calls", extra={"in_flight": self.transport.in_flight}
            )
            # End what is left through the backend first: a stream gets its answer so far
            # (finish reason CANCELLED), a unary call UNAVAILABLE, each counted as sent;
            # grpc's own stop would cut them all with UNAVAILABLE counted as CANCELLED.
            await self.backend.close()
            await self.transport.wait_idle(DRAIN_LINGER_S)
        else:
            # Keep answering UNAVAILABLE a moment: a call racing the shutdown of the
            # listener would otherwise be cut with CANCELLED, which clients do not retry.
            await asyncio.sleep(min(DRAIN_LINGER_S, max(0.0, grace - (time.monotonic() - started))))
        # Handlers are done, but for calls still reading their request (refused now), and
        # their last messages and status may still be on the way out: stop() waits for
        # those (rejecting new calls), at most the grace left (≥ 1 s).
        self.transport.cut_reads()
        await self.server.stop(grace=max(1.0, grace - (time.monotonic() - started)))
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        await self.backend.close()
        self._stop_metrics()
        log.info("stopped")

    async def close_ports(self) -> None:
        """After a failed start or drain: stop listening at once."""
        await self.server.stop(0)
        if self.health_server is not None:
            await self.health_server.stop(0)

    async def wait_stopped(self) -> bool:
        """Wait for the drain to end: True if it ended cleanly."""
        await self._stopped.wait()
        return not self._drain_failed


async def serve(settings: Settings, backend: Backend | None = None) -> int:
    """Run the server until SIGTERM/SIGINT has drained it; returns the exit code (0, or 1
    when the start or the drain failed)."""
    metrics = Metrics()
    if backend is None:
        if not settings.model_repository.is_dir():
            log.error(
                "start failed: the model repository %s is not a folder; set --model-repository "
                "/ %sMODEL_REPOSITORY (`make export` writes models/)",
                settings.model_repository,
                ENV_PREFIX,
            )
            return 1
        try:  # one the server's user may not list would fail the load with a traceback
            next(settings.model_repository.iterdir(), None)
        except OSError as error:
            log.error(
                "start failed: cannot list the model repository %s (%s); give the server's "
                "user read and search permission on it, or set --model-repository / "
                "%sMODEL_REPOSITORY",
                settings.model_repository,
                error.strerror or error,
                ENV_PREFIX,
            )
            return 1
        from service.engine import cuda_available
        from service.scheduler import Scheduler  # imports onnxruntime

        if settings.provider == "cuda" and not cuda_available():
            # Each model's load would fail alike, with a traceback, and the server would
            # listen, never ready, instead of exiting.
            log.error(
                "start failed: --provider cuda (%sPROVIDER), but this onnxruntime has no "
                "CUDAExecutionProvider; install onnxruntime-gpu, or set --provider auto or cpu",
                ENV_PREFIX,
            )
            return 1
        backend = Scheduler.from_settings(settings, metrics)
    server = InferenceServer(settings, backend, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_drain)

    # While the models load too: a version published after their scan would otherwise wait
    # for the next SIGHUP (the scheduler runs one load at a time).
    loop.add_signal_handler(signal.SIGHUP, server.on_reload_signal)
    # A SIGTERM or SIGINT held before the loop ran (service.signals) stops it before it
    # binds: nothing was accepted. A held SIGHUP needs nothing: start() loads the newest.
    held = set(signals.held())
    if held & {signal.SIGTERM, signal.SIGINT}:
        log.info("stopped before serving: a stop signal came while starting")
        await backend.close()
        return 0
    if signal.SIGHUP in held:
        log.info("a reload signal came while starting: the versions it loads are the newest")
    try:
        await server.start()
    except StartupError as error:
        log.error("start failed: %s", error)
        await server.close_ports()
        await backend.close()
        return 1
    except Exception:
        log.exception("start failed")
        await server.close_ports()
        await backend.close()
        return 1
    return 0 if await server.wait_stopped() else 1

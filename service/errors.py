"""The one place where domain errors become gRPC status codes.

Servicers raise or let through `service.domain.ServiceError`s; `status_of` maps them, and
the transport aborts with the result. Choices worth knowing:

* DeadlineUnmeetable → RESOURCE_EXHAUSTED, not DEADLINE_EXCEEDED: the request was refused
  at admission because this replica is too busy to answer in the time left. It is load
  shedding, like QueueFull, and a client (or proxy) may retry it on another replica at
  once; DEADLINE_EXCEEDED would claim the caller's deadline passed, which it has not.
* DeadlineExceeded (the deadline passed, or what is left of it is shorter than the least
  an idle server takes: one decode step, and a unary call's admission, so no replica could
  answer) → DEADLINE_EXCEEDED.
* TooManyCalls (the server holds SERVE_MAX_CALLS calls, or SERVE_MAX_ANSWER_BYTES of their
  answers undelivered) → RESOURCE_EXHAUSTED, load shedding like QueueFull, answered before
  the request is read.
* RequestTimeout (the request had not arrived SERVE_REQUEST_READ_TIMEOUT_S after the server
  began reading it) → DEADLINE_EXCEEDED: the server's deadline for the upload passed; the message
  says it is the server's, not the caller's.
* Cancelled → CANCELLED (the client went away; nobody reads the answer).
* RequestCut → CANCELLED: grpc ended a call whose request never arrived whole, as when its
  client goes away mid-request, or as grpc does itself for a request over its own limit
  (2 x the max message size, answered RESOURCE_EXHAUSTED by grpc): the two look alike
  to the handler, so both are counted, under their own reason.
* Unavailable (loading, draining, a retired version, a failed engine) → UNAVAILABLE, which
  clients retry.
* ResponseTooLarge and RequestTooLarge → RESOURCE_EXHAUSTED, what grpc itself answers for
  a message over the size limit; the message says which limit and what to do instead.
* Anything else is a bug: INTERNAL with a generic message (details only in the logs).

Beside its code, every failed call has a reason (`ServiceError.reason`; "internal" for a
bug, "cancelled" or "deadline_exceeded" when grpc cancels the handler): the label that
tells apart failures sharing a code. SERVER_SIDE_REASONS are the ones an operator answers
for (overload, drain, failures); CLIENT_SIDE_REASONS the caller's to fix.

Every failed call also carries a google.rpc.Status in its `grpc-status-details-bin`
trailer (the rich error model of Google's APIs, which grpcio-status, grpcurl and the other
languages' gRPC libraries read), so that a client's code can act on a failure without
parsing its message:

* an ErrorInfo, domain ERROR_DOMAIN: `reason` is the reason label upper-cased (QUEUE_FULL,
  DEADLINE_UNMEETABLE, ...) and `metadata` the error's facts (`ServiceError.facts`: the
  model, the limit, the estimate; `admitted` on DEADLINE_EXCEEDED says whether the call
  had taken a place in the queue, that is whether any work was spent on it);
* for INVALID_ARGUMENT, a BadRequest naming the field (`options.top_p`, `texts[2]`) and
  what is wrong with it.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.domain import (
    Cancelled,
    DeadlineExceeded,
    DeadlineUnmeetable,
    InvalidArgument,
    ModelNotFound,
    QueueFull,
    RequestCut,
    RequestTimeout,
    RequestTooLarge,
    ResponseTooLarge,
    ServiceError,
    TooManyCalls,
    Unauthenticated,
    Unavailable,
)

STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyCalls: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineUnmeetable: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ResponseTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    RequestCut: grpc.StatusCode.CANCELLED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

INTERNAL_MESSAGE = "internal error; the server log has the details under this request id"
INTERNAL_REASON = "internal"
# The failures an operator answers for: the error-ratio recording rule in
# deploy/monitoring/alerts.rules.yml counts these (a test keeps the two equal). An answer
# over the max message size is among them: what clients ask for needs a larger
# SERVE_MAX_MESSAGE_BYTES.
SERVER_SIDE_REASONS: frozenset[str] = frozenset(
    {
        "queue_full",
        "too_many_calls",
        "response_too_large",
        "deadline_unmeetable",
        "deadline_exceeded",
        "loading",
        "draining",
        "retired",
        "engine_failed",
        INTERNAL_REASON,
        ServiceError.reason,
    }
)
# The caller's: a bad or over-size request, an unknown model, no credentials, or a client
# that went away. The transport logs these at INFO, any other failure at WARNING (INTERNAL
# at ERROR).
CLIENT_SIDE_REASONS: frozenset[str] = frozenset(
    {
        "invalid_argument",
        "model_not_found",
        "unauthenticated",
        "request_too_large",
        "request_timeout",
        "request_cut",
        "cancelled",
    }
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """Status code, caller-facing message and reason label for an exception (INTERNAL if
    unexpected)."""
    if isinstance(exc, ServiceError):
        for cls in type(exc).__mro__:
            code = STATUS_OF.get(cls)  # type: ignore[arg-type]
            if code is not None:
                return code, str(exc) or cls.__name__, exc.reason
        return grpc.StatusCode.UNKNOWN, str(exc) or type(exc).__name__, exc.reason
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, INTERNAL_REASON


# The longest status message a caller is sent, in bytes of UTF-8. A failed call's trailers
# carry its message twice (grpc-message, which percent-encodes each byte past ASCII as
# three, and the google.rpc.Status beside it), and grpc fails a call whose trailers pass
# 8 KiB at random (all past 16 KiB): a listing of many loaded models would have failed the
# call it explains. Counted in characters, one whose names are not ASCII still did (1,024
# characters of CJK are 9 KiB as grpc-message).
MAX_MESSAGE_BYTES = 1024

ERROR_DOMAIN = "inference.v1"


def sent_message(message: str) -> str:
    """`message` as a caller is sent it: at most MAX_MESSAGE_BYTES of UTF-8, a longer one
    cut at a character's end with a note (the call's log line keeps it whole)."""
    data = message.encode()
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    note = (
        f" ... ({len(message):,} characters in all; the server log has the whole message "
        "under this call's request id)"
    )
    kept = data[: MAX_MESSAGE_BYTES - len(note)].decode(errors="ignore")
    return kept + note


# The trailer that carries the google.rpc.Status (grpcio-status's name for it).
DETAILS_KEY: str = rpc_status.GRPC_DETAILS_METADATA_KEY


def rich_status(
    code: grpc.StatusCode, message: str, reason: str, error: BaseException | None = None
) -> status_pb2.Status:
    """The google.rpc.Status of a failed call: its code and message as the call ends with
    them (readers check that they agree), an ErrorInfo, and a BadRequest for a bad field."""
    status = status_pb2.Status(code=code.value[0], message=message)
    facts = error.facts if isinstance(error, ServiceError) else {}
    info = error_details_pb2.ErrorInfo(reason=reason.upper(), domain=ERROR_DOMAIN, metadata=facts)
    status.details.add().Pack(info)
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


def code_name(code: grpc.StatusCode) -> str:
    """The status name used as the `code` metric label (OK, INVALID_ARGUMENT, ...)."""
    return str(code.name)

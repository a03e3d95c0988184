"""Structured JSON logs, one object per line on stderr, tagged with the request id.

The request id lives in a context variable set by the transport for each call, so any
log record emitted while serving that call on the event loop carries it; the engine's
worker thread serves many calls at once and names their ids itself (`request_ids`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# LogRecord attributes that are not user `extra=` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: time, level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "request_id" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# grpc's own log of a call whose last batch (answer and status) failed because the call was
# gone: the client went away, or its deadline passed, before the answer went out.
GRPC_LOGGER = "grpc._cython.cygrpc"
_BATCH_FAILED = "ExecuteBatchError raised in core by servicer method"
_CALL_GONE = 'Failed "execute_batch"'


class ClientGoneFilter(logging.Filter):
    """grpc logs an ERROR with a traceback when a unary call's answer cannot go out because
    its client has gone (a client that closed its connection with answers unread): what
    the client did, not a fault of the server's, so it becomes one INFO line. A batch grpc
    refused to start (a misuse, "Failed grpc_call_start_batch") stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.getMessage().startswith(_BATCH_FAILED) and str(error).startswith(_CALL_GONE):
            method = record.getMessage().removeprefix(_BATCH_FAILED).strip(" []")
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "a call's answer was not sent: its client had gone (%s)"
            record.args = (method,)
            record.exc_info, record.exc_text = None, None
        return True


def configure(level: str = "INFO", stream: Any = None) -> None:
    """Send every logger's records as JSON to stderr (idempotent: replaces our handler)."""
    grpc_log = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, ClientGoneFilter) for f in grpc_log.filters):
        grpc_log.addFilter(ClientGoneFilter())
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_service_json", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._service_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())

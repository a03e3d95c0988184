"""The one mapping from domain errors to status codes and failure reasons."""

from __future__ import annotations

import typing

import grpc
import pytest
from google.rpc import error_details_pb2

from service import domain
from service.errors import (
    CLIENT_SIDE_REASONS,
    ERROR_DOMAIN,
    INTERNAL_MESSAGE,
    SERVER_SIDE_REASONS,
    STATUS_OF,
    rich_status,
    status_of,
)
from service.metrics import Metrics

ERRORS = [
    cls
    for cls in vars(domain).values()
    if isinstance(cls, type) and issubclass(cls, domain.ServiceError)
]
UNAVAILABLE_REASONS = typing.get_args(domain.UnavailableReason)


def _instance(cls: type[domain.ServiceError]) -> domain.ServiceError:
    if cls is domain.InvalidArgument:
        return domain.InvalidArgument("texts", "is empty")
    if cls is domain.Unavailable:
        return domain.Unavailable("draining", reason="draining")
    return cls("message")


def test_every_reason_is_either_the_servers_or_the_callers() -> None:
    reasons = {_instance(cls).reason for cls in ERRORS} | set(UNAVAILABLE_REASONS)
    assert not SERVER_SIDE_REASONS & CLIENT_SIDE_REASONS
    assert reasons | {"internal"} == SERVER_SIDE_REASONS | CLIENT_SIDE_REASONS
    assert set(UNAVAILABLE_REASONS) <= SERVER_SIDE_REASONS


@pytest.mark.parametrize("cls", [c for c in ERRORS if c is not domain.ServiceError])
def test_each_domain_error_has_a_code_and_its_own_reason(cls: type[domain.ServiceError]) -> None:
    error = _instance(cls)
    code, message, reason = status_of(error)
    assert code == STATUS_OF[cls] and message == str(error)
    assert reason == error.reason != domain.ServiceError.reason


def test_unavailable_says_why_and_unexpected_errors_are_internal() -> None:
    for why in UNAVAILABLE_REASONS:
        assert status_of(domain.Unavailable("x", reason=why)) == (
            grpc.StatusCode.UNAVAILABLE,
            "x",
            why,
        )
    assert status_of(ValueError("secret")) == (
        grpc.StatusCode.INTERNAL,
        INTERNAL_MESSAGE,
        "internal",
    )
    assert status_of(domain.ServiceError("odd")) == (grpc.StatusCode.UNKNOWN, "odd", "unknown")


def test_the_failures_metric_names_every_reason() -> None:
    """Its help text is where an operator learns the reasons' meaning and side."""
    help_text = Metrics().request_failures._documentation
    for reason in (SERVER_SIDE_REASONS | CLIENT_SIDE_REASONS) - {domain.ServiceError.reason}:
        assert reason in help_text, reason


@pytest.mark.parametrize("cls", [c for c in ERRORS if c is not domain.ServiceError])
def test_each_failure_carries_its_reason_and_facts_as_a_rich_status(
    cls: type[domain.ServiceError],
) -> None:
    """The google.rpc.Status agrees with the call's code and message (readers check), its
    ErrorInfo names the reason and facts, and only a bad field adds a BadRequest."""
    error = _instance(cls)
    error.facts = {"model": "en-es:1", "max_queue": "2"}
    code, message, reason = status_of(error)
    status = rich_status(code, message, reason, error)
    assert (status.code, status.message) == (code.value[0], message)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == (reason.upper(), ERROR_DOMAIN)
    assert dict(info.metadata) == error.facts
    bad = error_details_pb2.BadRequest()
    if cls is domain.InvalidArgument:
        assert len(status.details) == 2 and status.details[1].Unpack(bad)
        assert [(v.field, v.description) for v in bad.field_violations] == [("texts", "is empty")]
    else:
        assert len(status.details) == 1


def test_a_bugs_rich_status_tells_nothing_of_it() -> None:
    code, message, reason = status_of(ValueError("secret"))
    status = rich_status(code, message, reason, ValueError("secret"))
    assert b"secret" not in status.SerializeToString()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "INTERNAL" and not info.metadata


def test_facts_are_strings_seconds_to_the_millisecond() -> None:
    error = domain.DeadlineUnmeetable("x", estimated_seconds=1.23456, queued=3, model="m:1")
    assert error.facts == {"estimated_seconds": "1.235", "queued": "3", "model": "m:1"}

"""loadtest.deadlines: its outcome classes, and a burst against the live server fixture."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from loadtest import deadlines
from service.client import Failure
from tests.conftest import free_port
from tests.loadtest.test_e2e import short_verses


def _found(reason: str, **facts: str) -> Failure:
    return Failure(reason, facts, {})


@pytest.mark.parametrize(
    ("code", "found", "expected"),
    [
        (grpc.StatusCode.OK, None, "served"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, _found("DEADLINE_UNMEETABLE"), "refused"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, _found("QUEUE_FULL"), "queue_full"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, _found("TOO_MANY_CALLS"), "queue_full"),
        # Never admitted: no rows spent on them, not expired.
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            _found("DEADLINE_EXCEEDED", admitted="false"),
            "too_short",
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            _found("DEADLINE_EXCEEDED", admitted="true"),
            "expired",
        ),
        # The client's own deadline: the server's answer had not come.
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, "expired"),
        (grpc.StatusCode.UNAVAILABLE, _found("DRAINING"), "unavailable"),
    ],
)
def test_a_status_names_what_happened_to_the_call(
    code: grpc.StatusCode, found: Failure | None, expected: str
) -> None:
    assert deadlines.outcome(code, found) == expected


@pytest.mark.e2e
def test_bursts_are_served_with_a_long_deadline_and_not_with_a_tiny_one(
    server: Any, tmp_path: Path
) -> None:
    inputs = short_verses(tmp_path / "short.txt")
    common = ["--target", server.address, "--calls", "4", "--texts", "2", "--inputs", str(inputs)]
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        deadlines.app, [*common, "--deadlines", "30,0.001", "--rounds", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(b["deadline_s"], b["round"]) for b in report["bursts"]] == [
        (30, 1), (0.001, 1), (30, 2), (0.001, 2),
    ]  # fmt: skip
    assert report["totals"]["30"] == {"served": 8}
    tiny = report["totals"]["0.001"]
    assert sum(tiny.values()) == 8 and "served" not in tiny
    # A tiny call finding the loop idle is too_short; one behind another's texts may be
    # refused as unmeetable while it still has time left (a CI run once saw that).
    assert set(tiny) <= {"too_short", "refused", "expired"}
    assert report["command"].startswith("python -m loadtest.deadlines")
    assert report["rounds"] == 2 and report["machine"]["cpu_count"]
    assert "| 30 | all | 8 | 0 | 0 | 0 | 0 |" in result.output


def test_a_target_that_does_not_answer_is_named() -> None:
    target = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(deadlines.app, ["--target", target, "--warm", "1"])
    assert result.exit_code == 1
    assert f"{target} did not answer a warm-up call: UNAVAILABLE" in result.output


def test_a_remote_target_is_refused() -> None:
    result = CliRunner().invoke(deadlines.app, ["--target", "203.0.113.7:50051"])
    assert result.exit_code == 2 and "not a loopback address" in result.output


@pytest.mark.e2e
def test_start_serves_the_repository_and_record_writes_the_section(
    model_repository: Path, tmp_path: Path
) -> None:
    """--start runs a server of its own for the bursts; --record writes the docs section
    between its markers, keeping the rest of the file. Its 192 calls log over 64 KiB: a
    server logging to a pipe nobody read stalled on a full pipe, every call after expired."""
    inputs = short_verses(tmp_path / "short.txt")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nkept\n\n{deadlines.BEGIN}\nold\n{deadlines.END}\n\ntail\n")
    args = ["--start", str(model_repository), "--calls", "64", "--texts", "1", "--rounds", "3"]
    args += ["--deadlines", "30", "--warm", "1", "--inputs", str(inputs), "--record", str(doc)]
    result = CliRunner().invoke(deadlines.app, args)
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.endswith("\ntail\n")
    assert "old" not in text and text.count(deadlines.BEGIN) == 1
    assert f"a fresh `python -m service --model-repository {model_repository}`" in text
    assert "| 30 | all | 192 | 0 | 0 | 0 | 0 |" in text
    assert "Reproduce: `python -m loadtest.deadlines" in text


def test_start_names_a_missing_repository() -> None:
    result = CliRunner().invoke(deadlines.app, ["--start", "no-such-repo"])
    assert result.exit_code == 2 and "no-such-repo: no such model repository" in result.output


@pytest.mark.parametrize("bad", ["", "1,x", "0", "700"])
def test_deadlines_out_of_range_are_refused(bad: str) -> None:
    result = CliRunner().invoke(deadlines.app, ["--deadlines", bad])
    assert result.exit_code == 2 and "--deadlines must be seconds" in result.output


def test_an_output_that_cannot_be_written_is_refused_before_the_bursts(tmp_path: Path) -> None:
    """--out in a missing folder failed with a traceback after every burst had run."""
    target = f"127.0.0.1:{free_port()}"  # nothing there: a burst would fail the warm-up
    result = CliRunner().invoke(
        deadlines.app, ["--target", target, "--out", str(tmp_path / "no" / "such.json")]
    )
    assert result.exit_code == 2, result.output
    assert "cannot be written" in result.output


@pytest.mark.e2e
def test_start_names_a_repository_with_no_model_at_once(tmp_path: Path) -> None:
    """A server that loads no model stays up, NOT_SERVING: --start reads its log and says
    so, instead of waiting out START_TIMEOUT_S."""
    empty = tmp_path / "models"
    empty.mkdir()
    started = time.monotonic()
    result = CliRunner().invoke(deadlines.app, ["--start", str(empty), "--warm", "0"])
    assert result.exit_code == 1
    assert "the server could load no model" in result.output
    assert time.monotonic() - started < deadlines.START_TIMEOUT_S / 2

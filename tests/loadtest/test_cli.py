"""`python -m loadtest run|sweep|soak` end to end against a fake in-process caller: the
provenance every report carries, records.jsonl, the client-limited sweep stop, and bad
options refused before any connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
from typer.testing import CliRunner

import loadtest.__main__ as cli
from loadtest import provenance
from loadtest.report import percentile
from loadtest.workload import CallOutcome, WorkItem

TARGET = "127.0.0.1:1"  # never reached: the fake caller stands in for the channel
COMMIT = re.compile(r"^([0-9a-f]{4,40}(-dirty)?|unknown)$")


class FakeCaller:
    """GrpcCaller's shape, serving in-process; records the wall time of every call."""

    calls: ClassVar[list[float]] = []
    block_s: ClassVar[float] = 0.0  # blocks the event loop per call (a client that cannot keep up)

    def __init__(self, target: str, **_: Any) -> None:
        self.target = target

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        return None

    async def close(self) -> None:
        return None

    async def __call__(self, item: WorkItem) -> CallOutcome:
        FakeCaller.calls.append(time.time())
        if self.block_s:
            time.sleep(self.block_s)  # on purpose: the loop cannot send on schedule
        await asyncio.sleep(0.002)
        return CallOutcome(input_tokens=4, output_tokens=3)


class NoConnection:
    """Stands in for GrpcCaller where the command must fail before connecting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("connected despite a bad option")


def verses(path: Path) -> Path:
    path.write_text("".join(f"verse number {i} of the test\n" for i in range(20)))
    return path


def invoke(args: list[str], caller: type = FakeCaller, block_s: float = 0.0) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "GrpcCaller", caller)
        mp.setattr(FakeCaller, "calls", [])
        mp.setattr(FakeCaller, "block_s", block_s)
        result = CliRunner().invoke(cli.app, args)
        calls = list(FakeCaller.calls)
    return result, calls


def common(tmp: Path, out: Path) -> list[str]:
    return [
        "--target",
        TARGET,
        "--inputs",
        str(verses(tmp / "verses.txt")),
        "--mix",
        "translate=1",
        "--out",
        str(out),
        "--no-progress",
        "--wait-ready",
        "1",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run (constant 20 req/s for 1.05 s: its sends span a full second), one sweep and
    one soak, each written to its own folder."""
    tmp = tmp_path_factory.mktemp("cli")
    done: dict[str, Any] = {}
    args = {
        "run": ["run", "--rate", "20", "--arrivals", "constant", "--duration", "1.05"],
        "sweep": ["sweep", "--rates", "20,30", "--step-duration", "0.3"],
        "soak": [
            "soak",
            "--rate",
            "20",
            "--minutes",
            "0.004",
            "--server-pid",
            str(os.getpid()),
            "--sample-interval",
            "0.05",
        ],
    }
    for name, head in args.items():
        out = tmp / name
        result, calls = invoke([*head, *common(tmp, out)])
        assert result.exit_code == 0, result.output
        done[name] = {"out": out, "calls": calls, "output": result.output}
    yield done


def test_meta_started_is_taken_before_the_run(runs: dict[str, Any]) -> None:
    run = runs["run"]
    meta = json.loads((run["out"] / "result.json").read_text())["meta"]
    calls = run["calls"]
    # The sends span a second, so even a whole-second stamp taken at the end would be
    # later than the first request.
    assert calls[-1] - calls[0] >= 0.95
    started = dt.datetime.fromisoformat(meta["started"]).timestamp()
    assert started <= calls[0] + 1e-3  # before the first request (ms precision)
    finished = dt.datetime.fromisoformat(meta["finished"]).timestamp()
    assert finished >= calls[-1] - 1e-3


@pytest.mark.parametrize("name", ["run", "sweep", "soak"])
def test_every_report_names_machine_versions_and_commit(runs: dict[str, Any], name: str) -> None:
    out = runs[name]["out"]
    meta = json.loads((out / "result.json").read_text())["meta"]
    machine = meta["machine"]
    assert machine["usable_cores"] >= 1 and machine["cpu_count"] >= 1
    assert len(machine["loadavg_at_start"]) == 3
    assert machine == {**provenance.machine(), "loadavg_at_start": machine["loadavg_at_start"]}
    versions = meta["versions"]
    assert versions["python"] and versions["grpcio"] and versions["protobuf"]
    assert COMMIT.match(meta["git_commit"]), meta["git_commit"]
    assert meta["git_commit"] == provenance.git_commit()
    md = (out / "summary.md").read_text()
    assert "- machine: `" in md and "usable_cores" in md and "grpcio" in md


def test_git_commit_flags_a_dirty_tree(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    clean = provenance.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{4,40}", clean), clean
    (tmp_path / "f.txt").write_text("b\n")
    assert provenance.git_commit(tmp_path) == clean + "-dirty"
    (tmp_path / "untracked.txt").write_text("new\n")  # untracked files do not count
    (tmp_path / "f.txt").write_text("a\n")
    assert provenance.git_commit(tmp_path) == clean


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["run", "soak"])
def test_runs_write_one_record_per_request(runs: dict[str, Any], name: str) -> None:
    out = runs[name]["out"]
    summary = json.loads((out / "result.json").read_text())["summary"]
    records = rows(out)
    assert len(records) == summary["requests"] == len(runs[name]["calls"])
    for r in records:
        assert r["code"] == "OK" and r["input_tokens"] == 4 and r["output_tokens"] == 3
        assert r["intended_s"] <= r["sent_s"] <= r["done_s"]
        assert r["latency_s"] == pytest.approx(r["done_s"] - r["intended_s"])
        assert {"ttft_s", "messages", "kind"} <= set(r)
    # The summary's figures follow from the records alone.
    latencies = [r["latency_s"] for r in records if r["code"] == "OK"]
    assert percentile(latencies, 99) == pytest.approx(summary["latency_s"]["p99"])
    assert "records.jsonl" in (out / "summary.md").read_text()
    assert "records.jsonl" in runs[name]["output"]  # the printed paths name it


def test_sweep_records_carry_their_step(runs: dict[str, Any]) -> None:
    out = runs["sweep"]["out"]
    data = json.loads((out / "result.json").read_text())
    records = rows(out)
    assert [sum(r["step"] == i for r in records) for i in range(2)] == [
        s["requests"] for s in data["steps"]
    ]
    assert {r["offered_rate"] for r in records} == {20.0, 30.0}


class DyingServer(FakeCaller):
    """Answers the first calls, then fails every one as a server that went away would."""

    async def __call__(self, item: WorkItem) -> CallOutcome:
        if len(FakeCaller.calls) < 5:
            return await super().__call__(item)
        FakeCaller.calls.append(time.time())
        return CallOutcome(code="UNAVAILABLE", detail="failed to connect to all addresses")


class SheddingServer(FakeCaller):
    """Refuses every other call for load (or lets its deadline pass), as an overloaded
    server does."""

    async def __call__(self, item: WorkItem) -> CallOutcome:
        outcome = await super().__call__(item)
        code, reason = (("RESOURCE_EXHAUSTED", "QUEUE_FULL"), ("DEADLINE_EXCEEDED", ""))[
            len(FakeCaller.calls) % 4 // 2
        ]
        return outcome if len(FakeCaller.calls) % 2 else CallOutcome(code=code, reason=reason)


class RefusingServer(FakeCaller):
    """Answers the first calls, then refuses the rest with `code` (a rotated token, say)."""

    code: ClassVar[str] = "UNAUTHENTICATED"

    async def __call__(self, item: WorkItem) -> CallOutcome:
        outcome = await super().__call__(item)
        return outcome if len(FakeCaller.calls) <= 3 else CallOutcome(code=self.code)


def test_a_run_whose_server_went_away_fails_with_its_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--rate", "40", "--duration", "0.5", *common(tmp_path, out)]
    result, calls = invoke(args, caller=DyingServer)
    assert result.exit_code == 1, result.output
    failed = len(calls) - 5
    assert f"{failed} of {len(calls)} requests failed (UNAVAILABLE {failed})" in result.output
    summary = json.loads((out / "result.json").read_text())["summary"]
    assert summary["errors"]["UNAVAILABLE"] == failed > 0


def test_load_shedding_does_not_fail_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--rate", "40", "--duration", "0.5", *common(tmp_path, out)]
    result, _ = invoke(args, caller=SheddingServer)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())["summary"]
    errors = summary["errors"]
    assert errors["RESOURCE_EXHAUSTED"] and errors["DEADLINE_EXCEEDED"]
    # Why, where the server said: the refusals' reason, counted apart.
    assert summary["error_reasons"] == {"QUEUE_FULL": errors["RESOURCE_EXHAUSTED"]}
    assert "why, as the server said: {'QUEUE_FULL': " in (out / "summary.md").read_text()


class OverSizeServer(FakeCaller):
    """Refuses every other answer as over the max message size: RESOURCE_EXHAUSTED, but
    the requests' fault, not shedding; as the server says it (`refusal`: its reason), or
    as grpc does (its wording, no reason)."""

    refusal: ClassVar[CallOutcome] = CallOutcome()

    async def __call__(self, item: WorkItem) -> CallOutcome:
        outcome = await super().__call__(item)
        return outcome if len(FakeCaller.calls) % 2 else self.refusal


@pytest.mark.parametrize(
    "refusal",
    [
        CallOutcome("RESOURCE_EXHAUSTED", detail="the answer is 5,000,000 bytes, over the "
                    "server's limit", reason="RESPONSE_TOO_LARGE"),
        CallOutcome("RESOURCE_EXHAUSTED", detail="Received message larger than max (5 vs. 4)"),
    ],
    ids=["server", "grpc"],
)  # fmt: skip
def test_answers_over_the_max_message_size_fail_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: CallOutcome
) -> None:
    monkeypatch.setattr(OverSizeServer, "refusal", refusal)
    out = tmp_path / "run"
    args = ["run", "--rate", "40", "--duration", "0.5", *common(tmp_path, out)]
    result, calls = invoke(args, caller=OverSizeServer)
    assert result.exit_code == 1, result.output
    assert f"(RESOURCE_EXHAUSTED {len(calls) // 2}), which is not load shedding" in result.output


@pytest.mark.parametrize("code", ["UNAUTHENTICATED", "CLIENT_CANCELLED", "INVALID_ARGUMENT"])
def test_any_other_failure_fails_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    monkeypatch.setattr(RefusingServer, "code", code)
    out = tmp_path / "run"
    args = ["run", "--rate", "40", "--duration", "0.5", *common(tmp_path, out)]
    result, calls = invoke(args, caller=RefusingServer)
    assert result.exit_code == 1, result.output
    assert f"({code} {len(calls) - 3}), which is not load shedding" in result.output


def test_sweep_stops_at_a_client_limited_step(tmp_path: Path) -> None:
    # Every call blocks the loop for 40 ms, so at most 25 req/s leave against 100 offered:
    # the client, not the (instant) server, is the limit, and the sweep must say so.
    out = tmp_path / "sweep"
    args = ["sweep", "--rates", "100,200", "--step-duration", "0.4", *common(tmp_path, out)]
    result, _ = invoke(args, block_s=0.04)
    assert result.exit_code == 0, result.output
    assert "client-limited" in result.output
    data = json.loads((out / "result.json").read_text())
    assert len(data["steps"]) == 1  # stopped there: 200 req/s was not run
    step = data["steps"][0]
    assert step["client_limited"] is True
    assert step["sent_rate"] < 0.6 * step["arrival_rate"]
    knee = data["knee"]
    assert knee["client_limited_rate"] == 100
    assert knee["saturated"] is False and knee["first_unhealthy_rate"] is None
    assert "100 (client-limited)" in (out / "summary.md").read_text()


BAD_OPTIONS: list[tuple[list[str], str]] = [
    (["run", "--rate", "0"], "--rate must be a finite number > 0"),
    (["run", "--rate", "-2"], "--rate must be a finite number > 0"),
    (["run", "--rate", "nan"], "--rate must be a finite number > 0"),
    (["run", "--rate", "inf"], "--rate must be a finite number > 0"),
    (["run", "--rate", "1e300"], "--rate must be <="),
    (["run", "--concurrency", "0"], "--concurrency must be >= 1"),
    (["run", "--concurrency", "-1"], "--concurrency must be >= 1"),
    (["run", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["run", "--max-new-tokens", str(2**32)], "--max-new-tokens must be <="),
    (["run", "--timeout", "0"], "--timeout must be a finite number > 0"),
    (["run", "--timeout", "nan"], "--timeout must be a finite number > 0"),
    (["run", "--max-in-flight", "0"], "--max-in-flight must be >= 1"),
    (["run", "--wait-ready", "-1"], "--wait-ready must be a finite number > 0"),
    (["sweep", "--rates", "1,nan"], "--rates must be a finite number > 0"),
    (["sweep", "--rates", "1,inf"], "--rates must be a finite number > 0"),
    (["sweep", "--start-rate", "nan"], "--start-rate must be a finite number > 0"),
    (["sweep", "--max-rate", "inf"], "--max-rate must be a finite number > 0"),
    (["sweep", "--timeout", "0"], "--timeout must be a finite number > 0"),
    (["sweep", "--max-in-flight", "0"], "--max-in-flight must be >= 1"),
    (["sweep", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 0"),
    (["sweep", "--slo-p99-ms", "0"], "--slo-p99-ms must be a finite number > 0"),
    (["soak", "--rate", "0"], "--rate must be a finite number > 0"),
    (["soak", "--rate", "nan"], "--rate must be a finite number > 0"),
    (["soak", "--minutes", "nan"], "--minutes must be a finite number > 0"),
    (["soak", "--sample-interval", "0"], "--sample-interval must be a finite number > 0"),
    (["soak", "--timeout", "-1"], "--timeout must be a finite number > 0"),
    (["soak", "--max-in-flight", "0"], "--max-in-flight must be >= 1"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS)
def test_bad_options_are_refused_before_connecting(
    tmp_path: Path, args: list[str], message: str
) -> None:
    full = [args[0], *common(tmp_path, tmp_path / "out"), *args[1:]]  # the bad value last
    if args[0] == "soak":
        full += ["--server-pid", str(os.getpid())]
    # A usage error (exit 2), and NoConnection proves no channel was opened.
    result, _ = invoke(full, caller=NoConnection)
    assert result.exit_code == 2, result.output
    # The error itself is one line naming the option and the bound.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "GrpcCaller", NoConnection)
        raw = CliRunner().invoke(cli.app, full, standalone_mode=False)
    assert isinstance(raw.exception, typer.BadParameter), raw.exception
    text = raw.exception.format_message()
    assert message in text and "\n" not in text
    assert not (tmp_path / "out").exists()


def test_a_missing_matplotlib_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The charts come last: without matplotlib (the `plot` extra) a run is refused at
    once, not after its load went out."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,  # type: ignore[attr-defined]
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else real(name, *args),
    )
    monkeypatch.setattr(cli, "GrpcCaller", NoConnection)
    raw = CliRunner().invoke(
        cli.app, ["run", *common(tmp_path, tmp_path / "out")], standalone_mode=False
    )
    assert isinstance(raw.exception, typer.BadParameter), raw.exception
    assert "transformer-serving[plot]" in raw.exception.format_message()
    assert not (tmp_path / "out").exists()


# The CLI in a child process with FakeCaller for the channel; the first request creates the
# file $SENDING, so the test interrupts a run that is under way.
CHILD = """
import os, pathlib
import loadtest.__main__ as cli
from tests.loadtest.test_cli import FakeCaller

class Announcing(FakeCaller):
    async def __call__(self, item):
        pathlib.Path(os.environ["SENDING"]).touch()
        return await super().__call__(item)

cli.GrpcCaller = Announcing
cli.main()
"""
ROOT = Path(__file__).resolve().parents[2]


def ctrl_c(tmp: Path, head: list[str], after_s: float = 1.0) -> tuple[int, str, Path]:
    """Run `python -m loadtest <head>`, press Ctrl-C after_s into the sending; the exit
    code, the output and the output folder."""
    out, sending = tmp / "out", tmp / "sending"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *head, *common(tmp, out)],
        cwd=ROOT,
        env={**os.environ, "SENDING": str(sending)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sending.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(after_s)
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    return child.returncode, output, out


def test_ctrl_c_ends_a_run_with_its_report(tmp_path: Path) -> None:
    code, output, out = ctrl_c(tmp_path, ["run", "--rate", "20", "--duration", "60"])
    assert code == 130, output
    assert "interrupted by Ctrl-C" in output
    summary = json.loads((out / "result.json").read_text())["summary"]
    stopped = summary["interrupted_at_s"]
    assert 1.0 <= stopped < 30
    assert summary["requests"] == len(rows(out)) > 0 and summary["errors"] == {}
    # Rates over the span that ran: ~20 req/s arrived, not a 60 s window's fraction of it.
    assert summary["arrival_rate"] == pytest.approx(summary["requests"] / stopped)
    assert summary["arrival_rate"] > 10
    assert f"stopped by Ctrl-C after {stopped:.1f} s" in (out / "summary.md").read_text()


def test_ctrl_c_ends_a_sweep_at_its_current_step(tmp_path: Path) -> None:
    code, output, out = ctrl_c(tmp_path, ["sweep", "--rates", "20,40", "--step-duration", "60"])
    assert code == 130, output
    steps = json.loads((out / "result.json").read_text())["steps"]
    assert len(steps) == 1  # 40 req/s was not run
    assert steps[0]["interrupted_at_s"] >= 1.0
    assert "stopped by Ctrl-C" in (out / "summary.md").read_text()


def test_ctrl_c_ends_a_soak_with_its_rss_so_far(tmp_path: Path) -> None:
    soak = ["soak", "--rate", "20", "--minutes", "1", "--server-pid", str(os.getpid())]
    code, output, out = ctrl_c(tmp_path, [*soak, "--sample-interval", "0.2"])
    assert code == 130, output
    data = json.loads((out / "result.json").read_text())
    assert data["summary"]["interrupted_at_s"] >= 1.0
    assert data["rss"]["samples"] >= 2
    assert (out / "server_rss.png").exists()
    assert "stopped by Ctrl-C" in (out / "summary.md").read_text()


def test_the_recorded_command_hides_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["run", "--token", "s3cret", "--rate", "5", "--token=s3cret2", "--mix", "translate=1"]
    monkeypatch.setattr("sys.argv", ["loadtest", *argv])
    meta = cli._meta(TARGET, Path("verses.tsv"), {"translate": 1.0}, 0)
    assert "s3cret" not in json.dumps(meta)
    assert meta["command"] == (
        "python -m loadtest run --token REDACTED --rate 5 --token=REDACTED --mix translate=1"
    )
    # Everything else is kept as it was run.
    assert (
        cli.recorded_command(["sweep", "--rates", "1,2"]) == "python -m loadtest sweep --rates 1,2"
    )

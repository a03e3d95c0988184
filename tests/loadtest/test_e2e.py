"""A short real load test against the live server fixture (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loadtest.__main__ import app
from loadtest.workload import load_texts
from tests.fixtures import VERSES as FIXTURE


def short_verses(path: Path) -> Path:
    """Fixture verses short enough for the test server's max_input_tokens (64) under the
    tiny tokenizer (vocabulary 256, a few characters per piece)."""
    texts = [t for t in load_texts(FIXTURE) if len(t) <= 60]
    assert len(texts) >= 10
    path.write_text("\n".join(texts) + "\n")
    return path


def _run(server: Any, tmp_path: Path, options: str) -> tuple[Any, Path]:
    """`python -m loadtest run` on short test verses against the live server: the CLI's
    result and the run's output folder."""
    out = tmp_path / "run"
    inputs = short_verses(tmp_path / "short.txt")
    args = f"run --target {server.address} --inputs {inputs} --out {out} --no-progress {options}"
    return CliRunner().invoke(app, args.split()), out


@pytest.mark.e2e
def test_three_second_loadtest_against_live_server(server: Any, tmp_path: Path) -> None:
    result, out = _run(
        server,
        tmp_path,
        "--rate 6 --arrivals poisson --duration 3 --max-requests 60 "
        "--mix translate=0.6,stream=0.2,generate=0.2 --max-new-tokens 8 --timeout 20",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())["summary"]
    assert summary["requests"] > 0
    assert summary["errors"] == {}, summary["error_examples"]
    assert summary["ok"] == summary["requests"]
    assert summary["throughput_rps"] > 0 and summary["tokens_per_s"] > 0
    assert set(summary["by_kind"]) == {"translate", "stream", "generate"}
    assert summary["ttft_s"]["count"] > 0  # streams reported time to first token
    # Every streamed message carried at least one token, and no token went uncounted.
    assert summary["by_kind"]["generate"]["tokens_per_message"] >= 1.0
    for name in ("summary.md", "latency_cdf.png", "latency_vs_load.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.e2e
def test_a_run_records_why_the_server_refused(server: Any, tmp_path: Path) -> None:
    """Each refused request's record keeps the reason the server sent with it (the server
    fixture allows 32 new tokens), and the summary counts them."""
    result, out = _run(
        server,
        tmp_path,
        "--rate 20 --arrivals constant --duration 0.3 --mix translate=0.5,stream=0.5 "
        "--max-new-tokens 33",
    )
    assert result.exit_code == 2, result.output  # none succeeded
    summary = json.loads((out / "result.json").read_text())["summary"]
    assert summary["error_reasons"] == {"INVALID_ARGUMENT": summary["requests"]} != {}
    records = (out / "records.jsonl").read_text().splitlines()
    assert all(json.loads(line)["reason"] == "INVALID_ARGUMENT" for line in records)

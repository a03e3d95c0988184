"""Percentile math against numpy, and the report files a run writes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from loadtest.generator import RequestRecord, RunResult
from loadtest.report import (
    distribution,
    find_knee,
    markdown_run,
    percentile,
    summarize,
    write_run_report,
    write_sweep_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n", [1, 2, 3, 10, 999, 1000, 12345])
def test_percentile_matches_numpy(n: int) -> None:
    rng = random.Random(n)
    values = [rng.lognormvariate(0, 1) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99.9) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_keys() -> None:
    d = distribution([0.1, 0.2, 0.3, 0.4])
    assert set(d) == {"count", "mean", "max", "p50", "p90", "p99", "p99.9"}
    assert d["count"] == 4 and d["max"] == 0.4
    assert d["mean"] == pytest.approx(0.25)
    assert distribution([])["p99"] is None


def fake_result(rate: float = 10.0, slow: float = 0.0) -> RunResult:
    records = []
    for i in range(200):
        kind = ("translate", "stream", "generate")[i % 3]
        t = i / rate
        code = "OK" if i % 50 else "RESOURCE_EXHAUSTED"
        stream = kind != "translate"
        records.append(
            RequestRecord(
                kind=kind,
                intended=t,
                sent=t + 0.001,
                done=t + 0.05 + slow + (i % 7) / 100,
                code=code,
                input_tokens=20,
                output_tokens=10,
                ttft=0.02 if stream else None,
                itl=[0.003] * 9 if stream else [],
                messages=5 if stream else 0,
            )
        )
    return RunResult(
        mode="open",
        elapsed_s=200 / rate,
        records=records,
        offered_rate=rate,
        arrivals="poisson",
        duration_s=200 / rate,
        max_requests=1000,
    )


def test_summary_counts_and_rates() -> None:
    s = summarize(fake_result())
    assert s["requests"] == 200 and s["ok"] == 196
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 4}
    assert s["throughput_rps"] == pytest.approx(196 / 20)
    assert s["tokens_per_s"] == pytest.approx(1960 / 20)
    assert s["ttft_s"]["p50"] == pytest.approx(0.02)
    assert s["itl_s"]["p99"] == pytest.approx(0.003)
    assert set(s["by_kind"]) == {"translate", "stream", "generate"}
    assert s["by_kind"]["translate"]["ttft_s"]["count"] == 0
    # 10 tokens in 5 messages per stream; unary calls do not count.
    assert s["tokens_per_message"] == pytest.approx(2.0)
    assert s["by_kind"]["translate"]["tokens_per_message"] is None


def test_run_report_files(tmp_path: Path) -> None:
    paths = write_run_report(tmp_path, fake_result(), {"command": "python -m loadtest run"})
    data = json.loads((tmp_path / "result.json").read_text())
    summary = data["summary"]
    for key in (
        "throughput_rps",
        "tokens_per_s",
        "errors",
        "latency_s",
        "ttft_s",
        "itl_s",
        "by_kind",
        "send_lag_s",
        "offered_rate",
    ):
        assert key in summary
    assert set(summary["latency_s"]) >= {"p50", "p90", "p99", "p99.9"}
    assert data["meta"]["command"] == "python -m loadtest run"
    md = (tmp_path / "summary.md").read_text()
    assert "| kind | requests | ok |" in md and "p99.9 ms" in md
    assert "| translate |" in md and "RESOURCE_EXHAUSTED" in md
    assert "streamed tokens per message: 2.00" in md
    for name in ("latency_cdf.png", "latency_vs_load.png"):
        blob = (tmp_path / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 2000
    assert set(paths) == {"json", "cdf", "load", "markdown"}


def test_markdown_closed_loop() -> None:
    result = fake_result()
    result.mode, result.concurrency, result.offered_rate = "closed", 8, None
    assert "closed loop, concurrency 8" in markdown_run(summarize(result))


def test_knee_detection() -> None:
    def step(rate: float, served: float, p99: float, errors: float = 0.0) -> dict:
        return {
            "offered_rate": rate,
            "throughput_rps": served,
            "error_rate": errors,
            "latency_s": {"p99": p99},
        }

    steps = [step(1, 1, 0.1), step(2, 2, 0.11), step(4, 3.9, 0.2), step(8, 5, 3.0)]
    knee = find_knee(steps)
    assert knee["knee_rate"] == 4 and knee["first_unhealthy_rate"] == 8 and knee["saturated"]
    # Latency blow-up alone (throughput still kept) marks the knee too.
    assert find_knee([step(1, 1, 0.1), step(2, 2, 0.9)])["knee_rate"] == 1
    assert find_knee([step(1, 1, 0.1), step(2, 2, 0.9)], slo_p99_s=1.0)["saturated"] is False
    assert find_knee([step(1, 1, 0.1, errors=0.5)])["knee_rate"] is None


def test_sweep_report_files(tmp_path: Path) -> None:
    results = [fake_result(1.0), fake_result(2.0), fake_result(4.0, slow=5.0)]
    write_sweep_report(tmp_path, results, {})
    data = json.loads((tmp_path / "result.json").read_text())
    assert len(data["steps"]) == 3 and "knee_rate" in data["knee"]
    assert "| offered req/s |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "latency_vs_load.png").read_bytes().startswith(PNG_MAGIC)

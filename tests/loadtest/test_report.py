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
    markdown_sweep,
    percentile,
    plot_latency_vs_load,
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
    assert set(paths) == {"json", "records", "cdf", "load", "markdown"}


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


# --- records, sent rate, client-limited steps, latency basis, p99.9, plot axis --------------


def test_run_report_writes_one_record_per_request(tmp_path: Path) -> None:
    result = fake_result()
    write_run_report(tmp_path, result, {})
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(result.records) == 200
    first, record = rows[0], result.records[0]
    assert first["intended_s"] == record.intended and first["sent_s"] == record.sent
    assert first["done_s"] == record.done and first["code"] == record.code
    assert first["latency_s"] == pytest.approx(record.latency)
    assert first["input_tokens"] == 20 and first["output_tokens"] == 10
    assert {"ttft_s", "messages", "itl_s", "kind", "send_lag_s"} <= set(first)
    # Every figure of the summary can be recomputed from the records.
    summary = json.loads((tmp_path / "result.json").read_text())["summary"]
    ok = [r for r in rows if r["code"] == "OK"]
    assert percentile([r["latency_s"] for r in ok], 99) == pytest.approx(
        summary["latency_s"]["p99"]
    )
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    assert percentile(ttft, 50) == pytest.approx(summary["ttft_s"]["p50"])
    assert sum(r["code"] != "OK" for r in rows) == sum(summary["errors"].values())
    assert "records.jsonl" in (tmp_path / "summary.md").read_text()


def test_sweep_report_writes_records_of_every_step(tmp_path: Path) -> None:
    write_sweep_report(tmp_path, [fake_result(1.0), fake_result(2.0)], {})
    rows = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 400
    assert [r["step"] for r in rows] == [0] * 200 + [1] * 200
    assert {r["offered_rate"] for r in rows} == {1.0, 2.0}
    assert "records.jsonl" in (tmp_path / "summary.md").read_text()


def lagging_result(lag: float, rate: float = 10.0, n: int = 100) -> RunResult:
    """Constant arrivals at `rate`; request i leaves `lag * i / n` late (a falling-behind
    client when lag is large)."""
    records = [
        RequestRecord(
            kind="translate",
            intended=i / rate,
            sent=i / rate + lag * i / n,
            done=i / rate + lag * i / n + 0.01,
            code="OK",
        )
        for i in range(n)
    ]
    return RunResult(
        mode="open",
        elapsed_s=n / rate + lag,
        records=records,
        offered_rate=rate,
        arrivals="constant",
        duration_s=n / rate,
        max_requests=n,
    )


def test_sent_rate_and_client_limited_flag() -> None:
    on_time = summarize(lagging_result(0.0))
    assert on_time["sent_rate"] == pytest.approx(on_time["arrival_rate"]) == pytest.approx(10)
    assert on_time["client_limited"] is False
    # The client ends 10 s behind a 10 s schedule: half the rate left, median lag 5 s.
    behind = summarize(lagging_result(10.0))
    assert behind["sent_rate"] == pytest.approx(100 / (9.9 + 9.9), rel=1e-6)
    assert behind["client_limited"] is True
    # Threshold: 10 % of the mean inter-arrival gap within [5, 50] ms.
    assert behind["client_lag_threshold_s"] == pytest.approx(0.01)
    assert summarize(lagging_result(0.018))["client_limited"] is False  # p50 lag ~9 ms
    assert summarize(lagging_result(0.022))["client_limited"] is True  # p50 lag ~11 ms
    assert summarize(lagging_result(0.0, rate=1000))["client_lag_threshold_s"] == 0.005
    assert summarize(lagging_result(0.0, rate=0.5))["client_lag_threshold_s"] == 0.05
    # CLIENT_BACKLOG requests never left: they do not count as sent.
    backlog = lagging_result(0.0)
    for r in backlog.records[50:]:
        r.code = "CLIENT_BACKLOG"
    assert summarize(backlog)["sent_rate"] == pytest.approx(5.0)
    # A closed loop has no schedule to fall behind.
    closed = lagging_result(0.0)
    closed.mode, closed.offered_rate, closed.concurrency = "closed", None, 4
    assert summarize(closed)["client_limited"] is None
    assert summarize(closed)["sent_rate"] == pytest.approx(10)


def test_markdown_shows_sent_rate_and_client_limited() -> None:
    md = markdown_run(summarize(lagging_result(10.0)))
    assert "10 req/s offered (10.00 req/s arrived, 5.05 req/s sent)" in md
    assert "**client-limited**" in md
    assert "client-limited" not in markdown_run(summarize(lagging_result(0.0)))


def step(rate: float, served: float, p99: float, client_limited: bool = False) -> dict:
    return {
        "offered_rate": rate,
        "arrival_rate": rate,
        "sent_rate": rate / 2 if client_limited else rate,
        "throughput_rps": served,
        "error_rate": 0.0,
        "ok": 100,
        "tokens_per_s": served,
        "errors": {},
        "latency_s": {"p50": p99 / 2, "p90": p99, "p99": p99, "p99.9": p99, "count": 100},
        "send_lag_s": {"p50": 1.0 if client_limited else 0.0, "p99": 2.0},
        "client_limited": client_limited,
    }


def test_knee_is_not_put_at_a_client_limited_step() -> None:
    # At 8 req/s the client fell behind (served half, huge p99): not the server's limit.
    steps = [step(1, 1, 0.1), step(2, 2, 0.11), step(8, 4, 3.0, client_limited=True)]
    knee = find_knee(steps)
    assert knee["saturated"] is False and knee["first_unhealthy_rate"] is None
    assert knee["client_limited_rate"] == 8 and knee["knee_rate"] == 2
    # Steps after a client-limited one are not judged either.
    knee = find_knee([*steps, step(16, 1, 9.0)])
    assert knee["saturated"] is False and knee["client_limited_rate"] == 8
    md = markdown_sweep(steps, knee)
    assert "| 8 (client-limited) | 8.00 | 4.00 |" in md
    assert "stopped at 8 req/s" in md and "not the server's limit" in md
    # A real saturation is still found below a client limit.
    assert find_knee([step(1, 1, 0.1), step(2, 1, 0.1)])["saturated"] is True


def test_latency_percentiles_state_their_basis() -> None:
    s = summarize(fake_result())
    assert s["latency_basis"]["ok"] == 196 and s["latency_basis"]["errors_excluded"] == 4
    assert s["latency_s"]["count"] == 196
    assert s["by_kind"]["translate"]["latency_basis"]["ok"] == s["by_kind"]["translate"]["ok"]
    md = markdown_run(s)
    assert "over the 196 successful requests; the 4 errors are excluded" in md
    sweep = markdown_sweep([s], find_knee([s]))
    assert "over its successful requests (the ok column); errors are excluded" in sweep
    assert "| 196 |" in sweep  # the ok count sits in the row beside the percentiles


def test_p999_is_printed_only_over_1000_samples() -> None:
    def all_row(md: str) -> list[str]:
        row = next(line for line in md.splitlines() if line.startswith("| all |"))
        return [c.strip() for c in row.strip("|").split("|")]

    header = "| kind | requests | ok | req/s | tok/s | p50 ms | p90 ms | p99 ms | p99.9 ms"
    col = [c.strip() for c in header.strip("|").split("|")].index("p99.9 ms")
    small = summarize(fake_result())  # 196 latencies
    assert all_row(markdown_run(small))[col] == "–"
    big = fake_result()
    big.records = [*big.records] * 6  # 1176 latencies
    s = summarize(big)
    assert all_row(markdown_run(s))[col] == f"{s['latency_s']['p99.9'] * 1000:.1f}"
    assert "at least 1000 samples" in markdown_run(small)


def test_load_plot_labels_what_it_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    labels: list[str] = []
    original = Axes.set_xlabel

    def record(self: Axes, label: str, *args: object, **kwargs: object) -> object:
        labels.append(label)
        return original(self, label, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Axes, "set_xlabel", record)
    closed = fake_result()
    closed.mode, closed.offered_rate, closed.concurrency = "closed", None, 8
    plot_latency_vs_load(tmp_path / "closed.png", [summarize(closed)], "closed")
    assert labels == ["served throughput (requests/s)"]
    plot_latency_vs_load(tmp_path / "open.png", [summarize(fake_result())], "open")
    assert labels[-1] == "offered load (requests/s)"

"""Summaries of load-test runs: percentiles, JSON, a Markdown summary and PNG plots.

Percentiles use numpy's default rule (linear interpolation between closest ranks) written
out here, so the summary needs no numpy and the unit tests can check it against numpy.
Latency percentiles are over successful requests; errors are counted by status code
beside them, so a run that fails fast cannot look fast. Every report also writes
records.jsonl, one JSON object per request, from which any figure here can be recomputed.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.generator import RequestRecord, RunResult

# Per-request records written next to result.json (one JSON object a line).
RECORDS_FILE = "records.jsonl"
# p99.9 is printed only over at least this many samples: below it, it is the maximum or
# an interpolation next to it, not a tail estimate (the JSON keeps the value and count).
P999_MIN_SAMPLES = 1000
# A step is "client-limited" when this load generator, not the server, kept requests from
# leaving on schedule: its median send lag exceeds 10 % of the mean inter-arrival gap of
# the offered rate, floored at 5 ms (sub-millisecond event-loop jitter at high rates is not
# a client limit) and capped at 50 ms (a median request 50 ms late is a client limit at any
# rate). Open loop only: a closed loop has no schedule to fall behind.
CLIENT_LAG_FRACTION = 0.10
CLIENT_LAG_FLOOR_S = 0.005
CLIENT_LAG_CAP_S = 0.050

QUANTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation, as numpy.percentile's default."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    return data[lo] + (data[hi] - data[lo]) * frac


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, max and the report's percentiles; None where there are no samples."""
    if not values:
        return {"count": 0, "mean": None, "max": None, **{k: None for k, _ in QUANTILES}}
    data = sorted(values)
    return {
        "count": len(data),
        "mean": sum(data) / len(data),
        "max": data[-1],
        **{name: percentile(data, q) for name, q in QUANTILES},
    }


def client_lag_threshold_s(offered_rate: float) -> float:
    """The median send lag above which an open-loop step counts as client-limited."""
    return min(CLIENT_LAG_CAP_S, max(CLIENT_LAG_FLOOR_S, CLIENT_LAG_FRACTION / offered_rate))


def sent_rate(records: Sequence[RequestRecord], duration_s: float) -> float | None:
    """Requests that actually left (CLIENT_BACKLOG ones never did) per second of sending:
    over the time of the last send, or the scheduled window when every send fell inside
    it, so a client that keeps up reports the arrival rate and one that falls behind
    reports less."""
    sent = [r for r in records if r.code != "CLIENT_BACKLOG"]
    if not sent:
        return None
    span = max(duration_s, max(r.sent for r in sent))
    return len(sent) / span if span > 0 else None


def _summarize_records(records: Sequence[RequestRecord], elapsed: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    errors = len(records) - len(ok)
    itl = [g for r in ok for g in r.itl]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    streamed = [r for r in ok if r.messages]
    messages = sum(r.messages for r in streamed)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(Counter(r.code for r in records if not r.ok).items())),
        # Why, where the server said (its google.rpc.ErrorInfo): a code alone does not tell
        # a full queue (QUEUE_FULL) from an unmeetable deadline (DEADLINE_UNMEETABLE).
        "error_reasons": dict(
            sorted(Counter(r.reason for r in records if not r.ok and r.reason).items())
        ),
        # One message per code, so a failing run says why without a debugger.
        "error_examples": {r.code: r.detail for r in reversed(records) if not r.ok},
        "error_rate": errors / len(records) if records else 0.0,
        "throughput_rps": len(ok) / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": out_tokens / elapsed if elapsed > 0 else 0.0,
        "input_tokens_per_s": sum(r.input_tokens for r in ok) / elapsed if elapsed > 0 else 0.0,
        "output_tokens": out_tokens,
        # Latency, TTFT and ITL are over the successful requests only; errors are excluded
        # (and counted above), so a run that fails fast cannot look fast.
        "latency_basis": {
            "over": "successful requests (status OK)",
            "ok": len(ok),
            "errors_excluded": errors,
        },
        "latency_s": distribution([r.latency for r in ok]),
        "ttft_s": distribution(ttft),
        "itl_s": distribution(itl),
        # The server joins tokens already waiting into one message when a stream falls
        # behind (service/scheduler.py `_coalesce`): 1.0 means one message per token.
        "tokens_per_message": (
            sum(r.output_tokens for r in streamed) / messages if messages else None
        ),
    }


def summarize(result: RunResult) -> dict[str, Any]:
    """The JSON-ready summary of one run, overall and by request kind."""
    records = result.records
    # The span of sending: shorter than the duration when --max-requests or Ctrl-C ended it.
    window = result.schedule_s or result.duration_s
    summary: dict[str, Any] = {
        "mode": result.mode,
        "offered_rate": result.offered_rate,
        "arrivals": result.arrivals,
        "concurrency": result.concurrency,
        "duration_s": result.duration_s,
        "max_requests": result.max_requests,
        "elapsed_s": result.elapsed_s,
        "interrupted_at_s": result.interrupted_at_s,
        # Realised arrival rate (a short Poisson run offers more or less than its rate).
        "arrival_rate": (len(records) / window if result.mode == "open" and window > 0 else None),
        **_summarize_records(records, result.elapsed_s),
        # What this client actually sent, beside the offered and the arrival rate: lower
        # than the arrival rate when the client fell behind its schedule.
        "sent_rate": sent_rate(records, window),
        # How late requests left versus their schedule: large values mean the client, not
        # the server, was the bottleneck (latency still counts from the schedule).
        "send_lag_s": distribution([r.lag for r in records]),
    }
    lag_p50 = summary["send_lag_s"]["p50"]
    if result.mode == "open" and result.offered_rate:
        threshold = client_lag_threshold_s(result.offered_rate)
        summary["client_lag_threshold_s"] = threshold
        summary["client_limited"] = lag_p50 is not None and lag_p50 > threshold
    else:
        summary["client_lag_threshold_s"] = None
        summary["client_limited"] = None
    kinds = sorted({r.kind for r in records})
    summary["by_kind"] = {
        kind: _summarize_records([r for r in records if r.kind == kind], result.elapsed_s)
        for kind in kinds
    }
    return summary


# --- sweep ---------------------------------------------------------------------------------


def healthy(step: dict[str, Any], slo_p99_s: float | None, base_p99_s: float | None) -> bool:
    """A step sustains its load: ≥ 90 % of arrivals served, ≤ 1 % errors, p99 in bounds.

    Without an SLO the bound is 5× the lowest p99 seen at lighter load: the knee is where
    queueing, not service time, starts to dominate. A client-limited step says nothing
    about the server either way; find_knee stops before judging it.
    """
    offered = step.get("arrival_rate") or step.get("offered_rate") or 0.0
    if step["throughput_rps"] < 0.9 * offered or step["error_rate"] > 0.01:
        return False
    p99 = step["latency_s"]["p99"]
    if p99 is None:
        return False
    if slo_p99_s is not None:
        return bool(p99 <= slo_p99_s)
    return base_p99_s is None or p99 <= 5.0 * base_p99_s


def find_knee(steps: Sequence[dict[str, Any]], slo_p99_s: float | None = None) -> dict[str, Any]:
    """The highest offered rate before the first unhealthy step, with the reason it ended.

    The walk stops at the first client-limited step without judging it: there the load
    generator, not the server, fell behind, so it is not the server's limit (saturated
    stays False and client_limited_rate names the step).
    """
    knee: dict[str, Any] | None = None
    base: float | None = None

    def result(
        first_unhealthy: float | None, client_limited: float | None, saturated: bool
    ) -> dict[str, Any]:
        return {
            "knee_rate": knee["offered_rate"] if knee else None,
            "knee_throughput_rps": knee["throughput_rps"] if knee else None,
            "knee_p99_s": knee["latency_s"]["p99"] if knee else None,
            "first_unhealthy_rate": first_unhealthy,
            "client_limited_rate": client_limited,
            "saturated": saturated,
        }

    for step in steps:
        if step.get("client_limited"):
            return result(None, step["offered_rate"], False)
        if not healthy(step, slo_p99_s, base):
            return result(step["offered_rate"], None, True)
        knee = step
        p99 = step["latency_s"]["p99"]
        base = p99 if base is None else min(base, p99)
    return result(None, None, False)


# --- writing -------------------------------------------------------------------------------


def _ms(value: float | int | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f}"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _rate_2(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _p999(dist: dict[str, Any]) -> str:
    """p99.9 in ms, or "–" below P999_MIN_SAMPLES samples."""
    return _ms(dist["p99.9"]) if (dist.get("count") or 0) >= P999_MIN_SAMPLES else "–"


def _basis(summary: dict[str, Any]) -> str:
    """The sentence saying what the latency percentiles are over."""
    ok, errors = summary["ok"], summary["requests"] - summary["ok"]
    return (
        f"Latency, TTFT and ITL percentiles are over the {ok} successful requests; "
        f"the {errors} errors are excluded (counted above). p99.9 is shown only over at "
        f"least {P999_MIN_SAMPLES} samples (– otherwise)."
    )


def _client_limited_md(summary: dict[str, Any]) -> list[str]:
    if not summary.get("client_limited"):
        return []
    return [
        f"- **client-limited**: the median send lag {_ms(summary['send_lag_s']['p50'])} ms "
        f"exceeds {_ms(summary['client_lag_threshold_s'])} ms (10 % of the mean inter-arrival "
        "gap, within 5–50 ms): this client, not the server, fell behind its schedule, so "
        "these figures do not show the server's limit"
    ]


def _interrupted_md(summary: dict[str, Any]) -> list[str]:
    if summary.get("interrupted_at_s") is None:
        return []
    return [
        f"- **interrupted**: stopped by Ctrl-C after {summary['interrupted_at_s']:.1f} s; "
        "the rates cover that span, not the whole duration"
    ]


def markdown_run(summary: dict[str, Any], title: str = "Load test") -> str:
    """A Markdown summary of one run: throughput, latency table by kind, errors."""
    sent = _rate_2(summary.get("sent_rate"))
    load = (
        f"open loop, {summary['arrivals']} arrivals at {_rate(summary['offered_rate'])} req/s "
        f"offered ({_rate_2(summary.get('arrival_rate'))} req/s arrived, {sent} req/s sent)"
        if summary["mode"] == "open"
        else f"closed loop, concurrency {summary['concurrency']} ({sent} req/s sent)"
    )
    lines = [
        f"# {title}",
        "",
        f"{load}; {summary['requests']} requests in {summary['elapsed_s']:.1f} s "
        f"(bounds: {summary['duration_s']:g} s, {summary['max_requests']} requests).",
        "",
        *_interrupted_md(summary),
        f"- throughput: **{summary['throughput_rps']:.2f} req/s**, "
        f"**{summary['tokens_per_s']:.1f} output tokens/s**",
        f"- errors: {summary['errors'] or 'none'} (rate {summary['error_rate']:.2%})",
        *(
            [f"  - why, as the server said: {summary['error_reasons']}"]
            if summary.get("error_reasons")
            else []
        ),
        *[f"  - {code}: {msg}" for code, msg in summary.get("error_examples", {}).items()],
        f"- send lag p50 {_ms(summary['send_lag_s']['p50'])} ms, p99 "
        f"{_ms(summary['send_lag_s']['p99'])} ms (client-side lateness; latency already "
        "includes it)",
        *_client_limited_md(summary),
        *(
            [f"- streamed tokens per message: {summary['tokens_per_message']:.2f}"]
            if summary.get("tokens_per_message") is not None
            else []
        ),
        "",
        _basis(summary),
        "",
        "| kind | requests | ok | req/s | tok/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
        "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("all", summary), *summary["by_kind"].items()]
    for kind, s in rows:
        lat, ttft, itl = s["latency_s"], s["ttft_s"], s["itl_s"]
        lines.append(
            f"| {kind} | {s['requests']} | {s['ok']} | {s['throughput_rps']:.2f} "
            f"| {s['tokens_per_s']:.1f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} "
            f"| {_ms(lat['p99'])} | {_p999(lat)} | {_ms(ttft['p50'])} "
            f"| {_ms(ttft['p99'])} | {_ms(itl['p50'])} | {_ms(itl['p99'])} |"
        )
    lines += ["", "Latency is measured from each request's intended send time.", ""]
    return "\n".join(lines)


def markdown_sweep(steps: Sequence[dict[str, Any]], knee: dict[str, Any]) -> str:
    if knee.get("client_limited_rate") is not None:
        ending = (
            f"; the sweep stopped at {_rate(knee['client_limited_rate'])} req/s, where this "
            "client fell behind its schedule (client-limited): that step is not the server's "
            "limit, which was not reached."
        )
    elif knee["saturated"]:
        ending = f"; first unhealthy step at {_rate(knee['first_unhealthy_rate'])} req/s."
    elif steps and steps[-1].get("interrupted_at_s") is not None:
        ending = "; the sweep was stopped by Ctrl-C before saturation (later rates not run)."
    else:
        ending = "; the sweep ended before saturation (raise --max-rate)."
    lines = [
        "# Rate sweep",
        "",
        f"Knee: **{_rate(knee['knee_rate'])} req/s offered** "
        f"({knee['knee_throughput_rps'] or 0:.2f} req/s served, p99 {_ms(knee['knee_p99_s'])} ms)"
        + ending,
        "",
        "| offered req/s | arrived req/s | sent req/s | served req/s | tok/s | ok | p50 ms "
        "| p90 ms | p99 ms | p99.9 ms | send lag p50 ms | send lag p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        lat, lag = s["latency_s"], s["send_lag_s"]
        offered = _rate(s["offered_rate"])
        if s.get("client_limited"):
            offered += " (client-limited)"
        if s.get("interrupted_at_s") is not None:
            offered += f" (Ctrl-C after {s['interrupted_at_s']:.1f} s)"
        lines.append(
            f"| {offered} | {_rate_2(s.get('arrival_rate'))} | {_rate_2(s.get('sent_rate'))} "
            f"| {s['throughput_rps']:.2f} | {s['tokens_per_s']:.1f} | {s['ok']} "
            f"| {_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | {_p999(lat)} "
            f"| {_ms(lag['p50'])} | {_ms(lag['p99'])} | {s['errors'] or 'none'} |"
        )
    lines += [
        "",
        "Latency counts from the intended send time. Each step's latency percentiles are over "
        "its successful requests (the ok column); errors are excluded from them and counted "
        f"in the errors column. p99.9 is shown only over at least {P999_MIN_SAMPLES} samples. "
        "A step is client-limited when its median send lag exceeds 10 % of the mean "
        "inter-arrival gap (within 5–50 ms): this client, not the server, fell behind its "
        "schedule, and the knee search stops there without counting it against the server.",
        "",
    ]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> Path:
    """Whole or not at all: a run cut by its time limit (the device run's stages) may be
    killed mid-write, and the file it leaves is read back (`--from-json`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".writing")
    scratch.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(scratch, path)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(path: Path, latencies_by_kind: Mapping[str, Sequence[float]], title: str) -> Path:
    """Empirical latency CDF per request kind (log x axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, values in sorted(latencies_by_kind.items()):
        data = sorted(v * 1000 for v in values)
        if not data:
            continue
        ys = [(i + 1) / len(data) for i in range(len(data))]
        ax.step(data, ys, where="post", label=f"{kind} (n={len(data)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency from intended send time (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_axis(steps: Sequence[dict[str, Any]]) -> tuple[list[float], str]:
    """x values and label: the offered rate in open loop; a closed loop offers no rate,
    so its points sit at their served throughput, and the label says so."""
    if all(s.get("offered_rate") for s in steps):
        return [s["offered_rate"] for s in steps], "offered load (requests/s)"
    return [s["throughput_rps"] for s in steps], "served throughput (requests/s)"


def plot_latency_vs_load(path: Path, steps: Sequence[dict[str, Any]], title: str) -> Path:
    """p50/p90/p99 latency against offered load (served throughput for a closed loop),
    with served throughput on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, xlabel = load_axis(steps)
    for name in ("p50", "p90", "p99"):
        ys = [(s["latency_s"][name] or math.nan) * 1000 for s in steps]
        ax.plot(xs, ys, marker="o", label=f"latency {name}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [s["throughput_rps"] for s in steps], "k--", marker="x", label="served req/s")
    ax2.set_ylabel("served requests/s")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_series(
    path: Path, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(xs), list(ys), marker=".")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latencies_by_kind(records: Iterable[RequestRecord]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in records:
        if r.ok:
            out.setdefault(r.kind, []).append(r.latency)
    return out


def record_row(record: RequestRecord, **extra: Any) -> dict[str, Any]:
    """One request as written to records.jsonl: times in seconds from the run start."""
    return {
        **extra,
        "kind": record.kind,
        "intended_s": record.intended,
        "sent_s": record.sent,
        "done_s": record.done,
        "code": record.code,
        "latency_s": record.latency,
        "send_lag_s": record.lag,
        "ttft_s": record.ttft,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "messages": record.messages,
        "itl_s": record.itl,
        "detail": record.detail,
        "reason": record.reason,
    }


def write_records(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    return path


def _records_md(sweep: bool = False) -> str:
    return (
        f"\nPer-request records: `{RECORDS_FILE}` (one JSON object per request"
        + (", with its step and offered rate" if sweep else "")
        + ": intended and actual send time, end, status code, latency, TTFT, tokens in and "
        "out, streamed messages; times in seconds from the start of its run), from which "
        "every figure above can be recomputed.\n"
    )


def write_run_report(out_dir: Path, result: RunResult, meta: dict[str, Any]) -> dict[str, Path]:
    """result.json, records.jsonl, summary.md, latency_cdf.png and latency_vs_load.png."""
    summary = summarize(result)
    paths = {
        "json": write_json(
            out_dir / "result.json", {"meta": meta, "summary": summary, "records": RECORDS_FILE}
        ),
        "records": write_records(out_dir / RECORDS_FILE, (record_row(r) for r in result.records)),
        "cdf": plot_cdf(
            out_dir / "latency_cdf.png", latencies_by_kind(result.records), "Latency CDF"
        ),
        "load": plot_latency_vs_load(
            out_dir / "latency_vs_load.png",
            [summary],
            "Latency vs offered load" if result.mode == "open" else "Latency vs served load",
        ),
    }
    md = out_dir / "summary.md"
    md.write_text(markdown_run(summary) + _records_md() + _meta_md(meta))
    paths["markdown"] = md
    return paths


def write_sweep_report(
    out_dir: Path,
    results: Sequence[RunResult],
    meta: dict[str, Any],
    slo_p99_s: float | None = None,
) -> dict[str, Path]:
    steps = [summarize(r) for r in results]
    knee = find_knee(steps, slo_p99_s)
    all_records = [rec for r in results for rec in r.records]
    rows = (
        record_row(rec, step=i, offered_rate=r.offered_rate)
        for i, r in enumerate(results)
        for rec in r.records
    )
    paths = {
        "json": write_json(
            out_dir / "result.json",
            {"meta": meta, "knee": knee, "steps": steps, "records": RECORDS_FILE},
        ),
        "records": write_records(out_dir / RECORDS_FILE, rows),
        "cdf": plot_cdf(
            out_dir / "latency_cdf.png",
            latencies_by_kind(all_records),
            "Latency CDF (all sweep steps)",
        ),
        "load": plot_latency_vs_load(
            out_dir / "latency_vs_load.png", steps, "Latency vs offered load"
        ),
    }
    md = out_dir / "summary.md"
    md.write_text(markdown_sweep(steps, knee) + _records_md(sweep=True) + _meta_md(meta))
    paths["markdown"] = md
    return paths


def _meta_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_meta_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _meta_md(meta: dict[str, Any]) -> str:
    if not meta:
        return ""
    lines = ["", "## Run", ""]
    lines += [f"- {k}: `{_meta_value(v)}`" for k, v in meta.items()]
    return "\n".join(lines) + "\n"

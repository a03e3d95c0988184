"""Load generator for the inference service: `python -m loadtest run|sweep|soak`.

Open loop (--rate, Poisson or constant arrivals) measures latency from each request's
intended send time, so server queueing shows up in the numbers (no coordinated omission);
closed loop (--concurrency) keeps N requests in flight. Every run is bounded (run:
--duration and --max-requests; sweep: --step-duration per step; soak: --minutes) and
targets loopback unless --allow-remote is given.
--ca (TLS), --server-name, --cert and --key (mutual TLS) and --token (or SERVE_AUTH_TOKEN)
reach a secured server.
Results go to --out: result.json, records.jsonl (one line per request), summary.md,
latency_cdf.png, latency_vs_load.png (soak: server_rss.png); result.json and summary.md
name the machine, package versions and commit. The first Ctrl-C stops sending, lets the
requests in flight finish, writes the report of what ran (marked interrupted) and exits
130; a second one interrupts at once. Otherwise the exit code is 0, or 1 when a request
ended other than OK or shed load (RESOURCE_EXHAUSTED other than a size refusal,
DEADLINE_EXCEEDED; see SHEDDING_CODES), or 2 when none succeeded or an option is wrong.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import importlib.util
import math
import platform
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest import provenance, report
from loadtest.generator import (
    ARRIVALS,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_REQUESTS_CAP,
    BoundsError,
    RequestRecord,
    RunResult,
    check_bounds,
    run_load,
)
from loadtest.soak import RssSampler, find_listening_pid, peak_rss_bytes
from loadtest.workload import (
    DEFAULT_TARGET,
    Caller,
    ChannelSecurity,
    GrpcCaller,
    TargetRefused,
    Workload,
    check_target,
    load_texts,
    parse_mix,
    resolve_inputs,
    split_target,
)
from service.client import (  # the same options as the client's
    Ca,
    Cert,
    ClientCertificateError,
    Key,
    ServerName,
    Token,
    client_certificate,
    tls_hint,
)

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)

DEFAULT_MIX = "translate=0.6,stream=0.2,generate=0.2"

# Options shared by every subcommand.
Target = Annotated[
    str, typer.Option(help="gRPC target host:port (loopback unless --allow-remote).")
]
AllowRemote = Annotated[bool, typer.Option(help="Allow a non-loopback target.")]
Inputs = Annotated[
    Path | None,
    typer.Option(help="Verses TSV (column en) (default: data/pairs.test.tsv, else fixture)."),
]
Mix = Annotated[str, typer.Option(help="Request mix, e.g. translate=0.6,stream=0.2,generate=0.2.")]
Seed = Annotated[int, typer.Option(help="Seed for arrivals, kinds and inputs.")]
Out = Annotated[
    Path | None, typer.Option(help="Output folder (default: runs/loadtest/<kind>-<time>).")
]
MaxNewTokens = Annotated[int, typer.Option(help="DecodingOptions.max_new_tokens (0 = default).")]
Timeout = Annotated[float, typer.Option(help="Per-request gRPC deadline in seconds.")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]
Arrivals = Annotated[str, typer.Option(help="Arrival process: poisson or constant.")]
MaxInFlight = Annotated[int, typer.Option(help="Open loop: client-side in-flight cap.")]


class _Fail(Exception):
    pass


def _out_dir(out: Path | None, kind: str) -> Path:
    if out is not None:
        return out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "loadtest" / f"{kind}-{stamp}"


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="milliseconds")


# Options whose value must not reach a report (result.json and summary.md get shared).
SECRET_OPTIONS = ("--token",)


def recorded_command(argv: list[str]) -> str:
    """The command as run, for the report, with the value of --token replaced by REDACTED."""
    args: list[str] = []
    hide = False
    for arg in argv:
        name = arg.partition("=")[0]
        if hide:
            args.append("REDACTED")
        elif name in SECRET_OPTIONS and "=" in arg:
            args.append(f"{name}=REDACTED")
        else:
            args.append(arg)
        hide = not hide and arg in SECRET_OPTIONS
    return shlex.join(["python", "-m", "loadtest", *args])


def _meta(
    target: str, inputs: Path, mix: dict[str, float], seed: int, **extra: Any
) -> dict[str, Any]:
    """Provenance of a run; call it before the run starts (its time, the load average)."""
    return {
        "command": recorded_command(sys.argv[1:]),
        "target": target,
        "inputs": str(inputs),
        "mix": mix,
        "seed": seed,
        "git_commit": provenance.git_commit(),
        "machine": provenance.machine(),
        "versions": {"python": platform.python_version(), **provenance.versions()},
        **extra,
        "started": _now(),
    }


# Outcomes other than OK that a run past capacity is expected to meet: the server shed load
# (a full queue, a deadline it could not meet) or the client could not send on schedule.
# Any other one fails the run (exit 1): the server failed, went away or refused the
# requests themselves (UNAVAILABLE, INTERNAL, UNAUTHENTICATED, INVALID_ARGUMENT, ...),
# ended a stream OK before its answer (STREAM_CANCELLED, STREAM_UNFINISHED), did not
# answer before the run's drain ended (CLIENT_CANCELLED), or the client broke.
SHEDDING_CODES = frozenset({"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CLIENT_BACKLOG"})
# RESOURCE_EXHAUSTED also refuses a request or answer over the max message size (the
# server's reasons, then grpc's own wording, which comes with none): not shedding, the
# run's requests are at fault.
SIZE_REASONS = frozenset({"REQUEST_TOO_LARGE", "RESPONSE_TOO_LARGE"})
GRPC_SIZE_REFUSAL = "larger than max"


def _failed(record: RequestRecord) -> bool:
    """Whether a request ended neither OK nor shed (see SHEDDING_CODES)."""
    if record.ok:
        return False
    if record.code == "RESOURCE_EXHAUSTED":
        return record.reason in SIZE_REASONS or GRPC_SIZE_REFUSAL in record.detail
    return record.code not in SHEDDING_CODES


# --- option checks: refused before any connection, as one-line usage errors (exit 2) ------

# DecodingOptions.max_new_tokens is a proto uint32; 0 leaves it unset (the server default).
MAX_NEW_TOKENS_LIMIT = 2**32 - 1
# Requests/s at most: beyond this no schedule can be kept or bounded (and rate x duration
# would pass the request cap anyway).
MAX_RATE = float(MAX_REQUESTS_CAP)


def _positive(name: str, value: float | None, upper: float = math.inf) -> None:
    """A finite number > 0, at most `upper` (None: the option is not in use)."""
    if value is None:
        return
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{name} must be a finite number > 0, got {value}")
    if value > upper:
        raise typer.BadParameter(f"{name} must be <= {upper:g}, got {value:g}")


def _at_least(name: str, value: int | None, low: int, note: str = "") -> None:
    if value is not None and value < low:
        raise typer.BadParameter(f"{name} must be >= {low}{note}, got {value}")


def _security(
    token: str | None, ca: Path | None, server_name: str | None, cert: Path | None, key: Path | None
) -> ChannelSecurity:
    """The channel's TLS and auth options, a client certificate checked before the run."""
    try:
        client_certificate(cert, key)
    except ClientCertificateError as error:
        raise typer.BadParameter(str(error), param_hint="--cert / --key") from None
    return ChannelSecurity(token, ca, server_name, cert, key)


def _check_common(
    max_new_tokens: int, timeout: float, max_in_flight: int, wait_ready: float
) -> None:
    _at_least("--max-new-tokens", max_new_tokens, 0, " (0 = the server's default)")
    if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise typer.BadParameter(
            f"--max-new-tokens must be <= {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}"
        )
    _positive("--timeout", timeout)
    _at_least("--max-in-flight", max_in_flight, 1)
    _positive("--wait-ready", wait_ready)
    if importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        raise typer.BadParameter(
            "the report's charts need matplotlib: pip install 'transformer-serving[plot]'"
        )


def _prepare(
    target: str, allow_remote: bool, inputs: Path | None, mix: str, seed: int
) -> tuple[Path, dict[str, float], Workload]:
    try:
        check_target(target, allow_remote)
        path = resolve_inputs(inputs)
        weights = parse_mix(mix)
        workload = Workload(load_texts(path), weights, seed)
    except (TargetRefused, FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    return path, weights, workload


def _progress(
    total: int | None, enabled: bool, desc: str
) -> tuple[Callable[[RequestRecord], None], Callable[[], None]]:
    """A tqdm bar that counts completions and shows errors; no-op when disabled."""
    if not enabled:
        return (lambda _r: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, file=sys.stderr)
    errors = 0

    def update(record: RequestRecord) -> None:
        nonlocal errors
        if not record.ok:
            errors += 1
            bar.set_postfix(errors=errors, refresh=False)
        bar.update()

    return update, bar.close


def _interrupt(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first Ctrl-C stops the run gracefully; the handler goes, so a second one raises
    KeyboardInterrupt at once."""
    stop.set()
    loop.remove_signal_handler(signal.SIGINT)


@dataclass(frozen=True)
class _Server:
    """The server a command loads and how its calls are made (the shared options)."""

    target: str
    timeout: float
    max_new_tokens: int
    wait_ready_s: float
    security: ChannelSecurity


def _drive(server: _Server, body: Callable[[Caller], Any], stop: asyncio.Event) -> Any:
    """Run `body` with a caller connected to a SERVING server; a server that never came up
    is a usage error. Ctrl-C while `body` runs sets `stop` instead of cancelling it, so
    the report of what ran can still be written."""

    async def connected() -> Any:
        caller = GrpcCaller(
            server.target,
            timeout_s=server.timeout,
            max_new_tokens=server.max_new_tokens,
            security=server.security,
        )
        try:
            try:
                await caller.wait_ready(server.wait_ready_s)
            except TimeoutError as error:
                security = server.security
                secure = security.ca is not None or security.cert is not None
                hint = tls_hint(str(error), security.cert is not None) if secure else None
                raise _Fail(
                    f"no server SERVING (grpc.health.v1) at {server.target} within "
                    f"{server.wait_ready_s:g} s (the last check: {error})"
                    + (f" {hint}" if hint else "")
                ) from error
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, _interrupt, loop, stop)
            try:
                return await body(caller)
            finally:
                loop.remove_signal_handler(signal.SIGINT)
        finally:
            await caller.close()

    try:
        return asyncio.run(connected())
    except _Fail as error:
        raise typer.BadParameter(str(error)) from error


def _expected(rate: float | None, duration: float, max_requests: int) -> int:
    return min(max_requests, int(rate * duration) + 1) if rate else max_requests


def _echo_paths(paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def _exit_for(records: list[RequestRecord], stop: asyncio.Event) -> None:
    """130 after Ctrl-C (as a shell reports it), so scripts see the run was cut short; 2
    when nothing succeeded; 1 when a request ended other than OK or shed (`_failed`; the
    report is written either way). Load shed on purpose is a result a sweep past capacity
    looks for, not a failure."""
    if stop.is_set():
        typer.echo("interrupted by Ctrl-C: the report covers the part that ran", err=True)
        raise typer.Exit(130)
    if not any(r.ok for r in records):
        typer.echo("no request succeeded", err=True)
        raise typer.Exit(2)
    failed = collections.Counter(r.code for r in records if _failed(r))
    if failed:
        counts = ", ".join(f"{code} {n}" for code, n in sorted(failed.items()))
        typer.echo(
            f"{failed.total()} of {len(records)} requests failed ({counts}), which is not "
            "load shedding; the report has their messages",
            err=True,
        )
        raise typer.Exit(1)


@app.command()
def run(
    target: Target = DEFAULT_TARGET,
    allow_remote: AllowRemote = False,
    rate: Annotated[float | None, typer.Option(help="Open loop: requests/s.")] = None,
    arrivals: Arrivals = "poisson",
    concurrency: Annotated[
        int | None, typer.Option(help="Closed loop: requests in flight.")
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds of sending (hard cap 24 h).")] = 10.0,
    max_requests: Annotated[int, typer.Option(help="Requests at most.")] = 10_000,
    mix: Mix = DEFAULT_MIX,
    inputs: Inputs = None,
    out: Out = None,
    seed: Seed = 0,
    max_new_tokens: MaxNewTokens = 0,
    timeout: Timeout = 30.0,
    max_in_flight: MaxInFlight = DEFAULT_MAX_IN_FLIGHT,
    wait_ready: Annotated[
        float, typer.Option(help="Seconds to wait for the server to be SERVING.")
    ] = 10.0,
    progress: Progress = True,
    token: Token = None,
    ca: Ca = None,
    server_name: ServerName = None,
    cert: Cert = None,
    key: Key = None,
) -> None:
    """One bounded run, open loop (--rate; default 5 req/s) or closed loop (--concurrency)."""
    _positive("--rate", rate, MAX_RATE)
    _at_least("--concurrency", concurrency, 1)
    _check_common(max_new_tokens, timeout, max_in_flight, wait_ready)
    security = _security(token, ca, server_name, cert, key)
    if rate is not None and concurrency is not None:
        raise typer.BadParameter("give --rate (open loop) or --concurrency (closed loop), not both")
    if rate is None and concurrency is None:
        rate = 5.0
    if arrivals not in ARRIVALS:
        raise typer.BadParameter(f"--arrivals must be one of {ARRIVALS}")
    try:
        check_bounds(duration, max_requests)
    except BoundsError as error:
        raise typer.BadParameter(str(error)) from error
    path, weights, workload = _prepare(target, allow_remote, inputs, mix, seed)
    out_dir = _out_dir(out, "run")
    meta = _meta(target, path, weights, seed, max_new_tokens=max_new_tokens)
    update, close = _progress(_expected(rate, duration, max_requests), progress, "loadtest")
    stop = asyncio.Event()
    server = _Server(target, timeout, max_new_tokens, wait_ready, security)

    async def body(caller: Caller) -> RunResult:
        return await run_load(
            caller,
            workload,
            rate=rate,
            arrivals=arrivals,
            concurrency=concurrency,
            duration_s=duration,
            max_requests=max_requests,
            seed=seed,
            drain_timeout_s=timeout + 5.0,
            max_in_flight=max_in_flight,
            on_done=update,
            stop=stop,
        )

    try:
        result: RunResult = _drive(server, body, stop)
    finally:
        close()
    meta["finished"] = _now()
    paths = report.write_run_report(out_dir, result, meta)
    typer.echo(report.markdown_run(report.summarize(result)))
    _echo_paths(paths)
    _exit_for(result.records, stop)


def _parse_rates(rates: str | None, start: float, factor: float, max_rate: float) -> list[float]:
    if rates:
        try:
            values = [float(r) for r in rates.split(",") if r.strip()]
        except ValueError as error:
            raise typer.BadParameter(f"--rates must be comma-separated numbers: {error}") from error
        for value in values:
            _positive("--rates", value, MAX_RATE)
    else:
        _positive("--start-rate", start, MAX_RATE)
        _positive("--max-rate", max_rate, MAX_RATE)
        _positive("--factor", factor)
        if factor <= 1 or max_rate < start:
            raise typer.BadParameter("need --start-rate > 0, --factor > 1, --max-rate >= start")
        values, r = [], start
        while r <= max_rate * (1 + 1e-9) and len(values) < 64:
            values.append(round(r, 6))
            r *= factor
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter("rates must be positive")
    return sorted(values)


@app.command()
def sweep(
    target: Target = DEFAULT_TARGET,
    allow_remote: AllowRemote = False,
    rates: Annotated[str | None, typer.Option(help="Explicit rates, e.g. 1,2,4,8.")] = None,
    start_rate: Annotated[float, typer.Option(help="First rate (geometric sweep).")] = 1.0,
    factor: Annotated[float, typer.Option(help="Rate multiplier per step.")] = 1.5,
    max_rate: Annotated[float, typer.Option(help="Last rate at most.")] = 64.0,
    step_duration: Annotated[
        float,
        typer.Option(
            help="Seconds per step. Make it long against the slowest requests (10x or more): "
            "a step is healthy when it served >= 90 % of its arrival rate, counted until its "
            "last answer, so long requests at its end weigh on a short step."
        ),
    ] = 10.0,
    max_requests: Annotated[int, typer.Option(help="Requests per step at most.")] = 5_000,
    slo_p99_ms: Annotated[
        float | None, typer.Option(help="p99 bound for a healthy step (default: 5x lowest p99).")
    ] = None,
    stop_after_unhealthy: Annotated[
        int,
        typer.Option(
            help="Stop after this many steps from the first unhealthy one (bounds the sweep)."
        ),
    ] = 1,
    arrivals: Arrivals = "poisson",
    mix: Mix = DEFAULT_MIX,
    inputs: Inputs = None,
    out: Out = None,
    seed: Seed = 0,
    max_new_tokens: MaxNewTokens = 0,
    timeout: Timeout = 30.0,
    max_in_flight: MaxInFlight = DEFAULT_MAX_IN_FLIGHT,
    wait_ready: Annotated[
        float, typer.Option(help="Seconds to wait for the server to be SERVING.")
    ] = 10.0,
    progress: Progress = True,
    token: Token = None,
    ca: Ca = None,
    server_name: ServerName = None,
    cert: Cert = None,
    key: Key = None,
) -> None:
    """Open-loop steps at rising rates until the latency curve bends (the knee)."""
    _check_common(max_new_tokens, timeout, max_in_flight, wait_ready)
    security = _security(token, ca, server_name, cert, key)
    _positive("--slo-p99-ms", slo_p99_ms)
    _at_least("--stop-after-unhealthy", stop_after_unhealthy, 1)
    rate_list = _parse_rates(rates, start_rate, factor, max_rate)
    try:
        check_bounds(step_duration, max_requests)
    except BoundsError as error:
        raise typer.BadParameter(str(error)) from error
    if arrivals not in ARRIVALS:
        raise typer.BadParameter(f"--arrivals must be one of {ARRIVALS}")
    path, weights, workload = _prepare(target, allow_remote, inputs, mix, seed)
    out_dir = _out_dir(out, "sweep")
    slo = slo_p99_ms / 1000 if slo_p99_ms is not None else None
    meta = _meta(
        target,
        path,
        weights,
        seed,
        rates=rate_list,
        step_duration_s=step_duration,
        slo_p99_ms=slo_p99_ms,
        arrivals=arrivals,
    )
    stop = asyncio.Event()
    server = _Server(target, timeout, max_new_tokens, wait_ready, security)

    async def body(caller: Caller) -> list[RunResult]:
        results: list[RunResult] = []
        steps: list[dict[str, Any]] = []
        unhealthy = 0
        for i, rate in enumerate(rate_list):
            update, close = _progress(
                _expected(rate, step_duration, max_requests), progress, f"{rate:g} req/s"
            )
            try:
                result = await run_load(
                    caller,
                    workload,
                    rate=rate,
                    arrivals=arrivals,
                    duration_s=step_duration,
                    max_requests=max_requests,
                    seed=seed + i,
                    drain_timeout_s=timeout + 5.0,
                    max_in_flight=max_in_flight,
                    on_done=update,
                    stop=stop,
                )
            finally:
                close()
            results.append(result)
            steps.append(report.summarize(result))
            if stop.is_set():  # Ctrl-C ended this step early: report the steps so far
                break
            if steps[-1]["client_limited"]:
                # Higher rates would only put this client further behind its schedule.
                typer.echo(
                    f"stopping the sweep at {rate:g} req/s: client-limited (median send lag "
                    f"{steps[-1]['send_lag_s']['p50'] * 1000:.1f} ms), not the server's limit",
                    err=True,
                )
                break
            knee = report.find_knee(steps, slo)
            if knee["saturated"]:
                unhealthy += 1
                if unhealthy >= stop_after_unhealthy:
                    break
        return results

    results: list[RunResult] = _drive(server, body, stop)
    meta["finished"] = _now()
    paths = report.write_sweep_report(out_dir, results, meta, slo)
    steps = [report.summarize(r) for r in results]
    typer.echo(report.markdown_sweep(steps, report.find_knee(steps, slo)))
    _echo_paths(paths)
    _exit_for([rec for r in results for rec in r.records], stop)


@app.command()
def soak(
    target: Target = DEFAULT_TARGET,
    allow_remote: AllowRemote = False,
    rate: Annotated[float, typer.Option(help="Requests/s (open loop).")] = 5.0,
    minutes: Annotated[float, typer.Option(help="Minutes at that rate (hard cap 24 h).")] = 10.0,
    max_requests: Annotated[
        int | None, typer.Option(help="Requests at most (default: rate x duration).")
    ] = None,
    server_pid: Annotated[
        int | None, typer.Option(help="Server pid (default: the process listening on the port).")
    ] = None,
    sample_interval: Annotated[float, typer.Option(help="Seconds between RSS samples.")] = 1.0,
    arrivals: Arrivals = "poisson",
    mix: Mix = DEFAULT_MIX,
    inputs: Inputs = None,
    out: Out = None,
    seed: Seed = 0,
    max_new_tokens: MaxNewTokens = 0,
    timeout: Timeout = 30.0,
    max_in_flight: MaxInFlight = DEFAULT_MAX_IN_FLIGHT,
    wait_ready: Annotated[
        float, typer.Option(help="Seconds to wait for the server to be SERVING.")
    ] = 10.0,
    progress: Progress = True,
    token: Token = None,
    ca: Ca = None,
    server_name: ServerName = None,
    cert: Cert = None,
    key: Key = None,
) -> None:
    """A fixed rate for N minutes, sampling the server's RSS (leaks, fragmentation)."""
    _positive("--rate", rate, MAX_RATE)
    _positive("--minutes", minutes)
    _positive("--sample-interval", sample_interval)
    _check_common(max_new_tokens, timeout, max_in_flight, wait_ready)
    security = _security(token, ca, server_name, cert, key)
    duration = minutes * 60.0
    # Without --max-requests, rate x duration; past the cap, check_bounds refuses it.
    cap = (
        max_requests
        if max_requests is not None
        else int(min(rate * duration, MAX_REQUESTS_CAP)) + 1
    )
    try:
        check_bounds(duration, cap)
    except BoundsError as error:
        raise typer.BadParameter(str(error)) from error
    if arrivals not in ARRIVALS:
        raise typer.BadParameter(f"--arrivals must be one of {ARRIVALS}")
    path, weights, workload = _prepare(target, allow_remote, inputs, mix, seed)
    pid = server_pid
    if pid is None:
        _, port = split_target(target)
        pid = find_listening_pid(port) if port is not None else None
        if pid is None:
            raise typer.BadParameter(
                f"cannot find the process listening on {target}; pass --server-pid"
            )
    out_dir = _out_dir(out, "soak")
    meta = _meta(target, path, weights, seed, server_pid=pid, minutes=minutes)
    sampler = RssSampler(pid, sample_interval)
    update, close = _progress(_expected(rate, duration, cap), progress, "soak")
    stop = asyncio.Event()
    server = _Server(target, timeout, max_new_tokens, wait_ready, security)

    async def body(caller: Caller) -> RunResult:
        finished = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(finished))
        try:
            return await run_load(
                caller,
                workload,
                rate=rate,
                arrivals=arrivals,
                duration_s=duration,
                max_requests=cap,
                seed=seed,
                drain_timeout_s=timeout + 5.0,
                max_in_flight=max_in_flight,
                on_done=update,
                stop=stop,
            )
        finally:
            finished.set()
            await sampling

    try:
        result: RunResult = _drive(server, body, stop)
    finally:
        close()
    rss = sampler.summary()
    with contextlib.suppress(OSError, ProcessLookupError):
        rss["peak_hwm_bytes"] = peak_rss_bytes(pid)
    meta["finished"] = _now()
    paths = report.write_run_report(out_dir, result, meta)
    summary = report.summarize(result)
    report.write_json(
        out_dir / "result.json",
        {"meta": meta, "summary": summary, "rss": rss, "records": report.RECORDS_FILE},
    )
    if sampler.rss:
        paths["rss"] = report.plot_series(
            out_dir / "server_rss.png",
            [t / 60 for t in sampler.times],
            [b / 2**20 for b in sampler.rss],
            "minutes",
            "server RSS (MiB)",
            f"Server RSS at {rate:g} req/s (pid {pid})",
        )
    md = paths["markdown"]
    md.write_text(md.read_text() + _rss_md(rss))
    typer.echo(report.markdown_run(summary, "Soak") + _rss_md(rss))
    _echo_paths(paths)
    _exit_for(result.records, stop)


def _rss_md(rss: dict[str, Any]) -> str:
    if not rss.get("samples"):
        return f"\nServer RSS: no samples ({rss.get('error')}).\n"
    mib = 2**20
    return (
        f"\n## Server RSS (pid {rss['pid']})\n\n"
        f"start {rss['start_bytes'] / mib:.1f} MiB, end {rss['end_bytes'] / mib:.1f} MiB, "
        f"peak {rss['peak_bytes'] / mib:.1f} MiB; second-half growth "
        f"{rss['second_half_growth_bytes'] / mib:+.1f} MiB "
        f"({rss['second_half_growth_bytes_per_min'] / mib:+.2f} MiB/min), "
        f"{rss['samples']} samples.\n"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()

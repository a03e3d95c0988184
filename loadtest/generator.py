"""Open- and closed-loop request scheduling with latency free of coordinated omission.

Open loop: every request gets an *intended* send time from the arrival schedule (constant
spacing or Poisson) before the run starts, and its latency is `completion - intended`. If
the server (or this client) falls behind, requests go out late, and that lateness is part
of their latency: a slow server cannot hide its queue by slowing the load generator down.
Closed loop: N workers each send the next request as soon as their previous one finished;
there the intended time is the moment a worker became free.

Every run is bounded twice: a request count and a wall-clock duration, and in-flight work
is given a drain timeout after the last send; what is still running then is cancelled and
counted as an error (CLIENT_CANCELLED), never silently dropped. An optional `stop` event
(the CLI sets it on Ctrl-C) ends the sending early the same way, so a cut-short run still
has its records.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from loadtest.workload import Caller, CallOutcome, WorkItem, Workload

Arrivals = Literal["poisson", "constant"]
ARRIVALS: tuple[str, ...] = ("poisson", "constant")

# Hard caps: no flag can make a run unbounded.
MAX_REQUESTS_CAP = 10_000_000
MAX_DURATION_CAP_S = 24 * 3600.0
# Client-side limit on requests in flight in open loop; beyond it a request is recorded as
# CLIENT_BACKLOG at its intended time instead of growing memory without bound.
DEFAULT_MAX_IN_FLIGHT = 4096


class BoundsError(ValueError):
    """A run that would not be bounded in count or time."""


def check_bounds(duration_s: float, max_requests: int) -> None:
    if not 0 < duration_s <= MAX_DURATION_CAP_S:
        raise BoundsError(
            f"duration must be in (0, {MAX_DURATION_CAP_S:.0f}] seconds, got {duration_s}"
        )
    if not 0 < max_requests <= MAX_REQUESTS_CAP:
        raise BoundsError(f"max requests must be in [1, {MAX_REQUESTS_CAP}], got {max_requests}")


# --- arrival schedules ---------------------------------------------------------------------


def arrival_offsets(
    arrivals: str, rate: float, duration_s: float, max_requests: int, seed: int = 0
) -> list[float]:
    """Intended send times (seconds from start) below duration_s, at most max_requests.

    constant: i / rate. poisson: cumulative exponential gaps with mean 1 / rate (seeded),
    the arrivals of independent users.
    """
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate}")
    check_bounds(duration_s, max_requests)
    offsets: list[float] = []
    if arrivals == "constant":
        n = min(max_requests, math.ceil(duration_s * rate))
        offsets = [i / rate for i in range(n)]
        return [t for t in offsets if t < duration_s]
    rng = random.Random(seed)
    t = 0.0
    while len(offsets) < max_requests:
        if t >= duration_s:
            break
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


# --- records -------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request's timeline in seconds from the run start (perf_counter based)."""

    kind: str
    intended: float
    sent: float
    done: float
    code: str
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # first token chunk - intended (streams only)
    itl: list[float] = field(default_factory=list)  # one per streamed token after the first
    messages: int = 0  # streamed messages that carried tokens (streams only)
    detail: str = ""  # the error message, for errors only
    reason: str = ""  # why the server failed it (QUEUE_FULL, ...), when it said

    @property
    def latency(self) -> float:
        return self.done - self.intended

    @property
    def lag(self) -> float:
        """How late the request left compared with its schedule (client or loop overload)."""
        return self.sent - self.intended

    @property
    def ok(self) -> bool:
        return self.code == "OK"


@dataclass
class RunResult:
    mode: Literal["open", "closed"]
    elapsed_s: float
    records: list[RequestRecord]
    offered_rate: float | None = None
    arrivals: str | None = None
    concurrency: int | None = None
    duration_s: float = 0.0
    max_requests: int = 0
    # The span of sending: open loop, the arrival schedule, duration_s unless --max-requests
    # ended it first (then the last arrival plus one mean gap); closed loop, duration_s
    # unless --max-requests ended it first (then until its last answer); either loop, at
    # most interrupted_at_s; None: duration_s.
    schedule_s: float | None = None
    # Seconds into the run when `stop` ended the sending early (Ctrl-C); None: it was not.
    interrupted_at_s: float | None = None


def make_record(
    item: WorkItem, outcome: CallOutcome, t0: float, intended: float, sent: float, done: float
) -> RequestRecord:
    """Turn absolute perf_counter times into a record measured from the intended time."""
    ttft = None
    itl: list[float] = []
    if outcome.chunk_times:
        ttft = outcome.chunk_times[0] - intended
        # As the client saw them: a message's first token waited the whole gap since the
        # message before, its others none (they came with it). Split evenly, a stall of the
        # stream would hide in small gaps. (The server's inference_inter_token_latency_seconds
        # times each token at the end of its own step, so the two differ where a stream fell
        # behind and the server joined tokens into one message; for a streamed beam search,
        # whose tokens settle together, they agree.)
        for i, at in enumerate(outcome.chunk_times):
            n = max(1, outcome.chunk_tokens[i] if i < len(outcome.chunk_tokens) else 1)
            if i:
                itl.append(at - outcome.chunk_times[i - 1])
            itl.extend([0.0] * (n - 1))
    return RequestRecord(
        kind=item.kind,
        intended=intended - t0,
        sent=sent - t0,
        done=done - t0,
        code=outcome.code,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        ttft=ttft,
        itl=itl,
        messages=len(outcome.chunk_times),
        detail=outcome.detail if outcome.code != "OK" else "",
        reason=outcome.reason if outcome.code != "OK" else "",
    )


OnDone = Callable[[RequestRecord], None]


async def _stopped_after(delay: float, stop: asyncio.Event | None) -> bool:
    """Sleep `delay` seconds, cut short when `stop` is set; True when it is (send no more)."""
    if stop is None:
        if delay > 0:
            await asyncio.sleep(delay)
        return False
    if delay > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


# --- open loop -----------------------------------------------------------------------------


async def run_open_loop(
    caller: Caller,
    items: Sequence[WorkItem],
    offsets: Sequence[float],
    *,
    drain_timeout_s: float = 30.0,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    on_done: OnDone | None = None,
    clock: Callable[[], float] = time.perf_counter,
    stop: asyncio.Event | None = None,
) -> list[RequestRecord]:
    """Send items[i] at t0 + offsets[i] regardless of how earlier requests are doing, until
    `stop` is set."""
    if len(items) < len(offsets):
        raise ValueError(f"need one item per arrival: {len(items)} items, {len(offsets)} arrivals")
    records: list[RequestRecord] = []
    in_flight: set[asyncio.Task[None]] = set()
    t0 = clock()

    def finish(record: RequestRecord) -> None:
        records.append(record)
        if on_done is not None:
            on_done(record)

    async def one(item: WorkItem, intended: float) -> None:
        sent = clock()
        try:
            outcome = await caller(item)
        except asyncio.CancelledError:
            finish(
                make_record(item, CallOutcome(code="CLIENT_CANCELLED"), t0, intended, sent, clock())
            )
            raise
        except Exception as error:  # a caller bug is an error of that request, not the run
            outcome = CallOutcome(code="CLIENT_ERROR", detail=repr(error)[:200])
        finish(make_record(item, outcome, t0, intended, sent, clock()))

    for item, offset in zip(items, offsets, strict=False):
        intended = t0 + offset
        if await _stopped_after(intended - clock(), stop):
            break
        if len(in_flight) >= max_in_flight:
            now = clock()
            backlog = CallOutcome(
                code="CLIENT_BACKLOG",
                detail=f"not sent: {max_in_flight} requests already in flight (--max-in-flight)",
            )
            finish(make_record(item, backlog, t0, intended, now, now))
            continue
        task = asyncio.create_task(one(item, intended))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await _drain(in_flight, drain_timeout_s)
    return records


async def _drain(tasks: set[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for in-flight requests up to timeout_s, then cancel (and so record) the rest."""
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, timeout_s))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


# --- closed loop ---------------------------------------------------------------------------


async def run_closed_loop(
    caller: Caller,
    workload: Workload,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    *,
    drain_timeout_s: float = 30.0,
    on_done: OnDone | None = None,
    clock: Callable[[], float] = time.perf_counter,
    stop: asyncio.Event | None = None,
) -> list[RequestRecord]:
    """`concurrency` workers, each sending its next request when the last one returns,
    until `stop` is set."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    check_bounds(duration_s, max_requests)
    records: list[RequestRecord] = []
    t0 = clock()
    deadline = t0 + duration_s
    claimed = 0
    stopping = stop if stop is not None else asyncio.Event()  # never set: run to the bounds

    async def worker() -> None:
        nonlocal claimed
        while claimed < max_requests and clock() < deadline and not stopping.is_set():
            claimed += 1
            item = workload.next()
            intended = clock()
            try:
                outcome = await caller(item)
            except asyncio.CancelledError:
                records.append(
                    make_record(
                        item, CallOutcome(code="CLIENT_CANCELLED"), t0, intended, intended, clock()
                    )
                )
                raise
            except Exception as error:
                outcome = CallOutcome(code="CLIENT_ERROR", detail=repr(error)[:200])
            record = make_record(item, outcome, t0, intended, intended, clock())
            records.append(record)
            if on_done is not None:
                on_done(record)

    tasks = {asyncio.create_task(worker()) for _ in range(concurrency)}
    # Workers stop claiming at the deadline or when `stop` is set; from then on, in-flight
    # calls get the drain timeout.
    stopped = asyncio.create_task(stopping.wait())
    sending: set[asyncio.Future[Any]] = {asyncio.gather(*tasks, return_exceptions=True), stopped}
    await asyncio.wait(sending, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await _drain({task for task in tasks if not task.done()}, drain_timeout_s)
    return records


# --- one run -------------------------------------------------------------------------------


async def _set_at(event: asyncio.Event) -> float:
    """The perf_counter time `event` was set: when an interruption stopped the sending."""
    await event.wait()
    return time.perf_counter()


async def run_load(
    caller: Caller,
    workload: Workload,
    *,
    rate: float | None,
    arrivals: str = "poisson",
    concurrency: int | None = None,
    duration_s: float = 10.0,
    max_requests: int = 10_000,
    seed: int = 0,
    drain_timeout_s: float = 30.0,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    on_done: OnDone | None = None,
    stop: asyncio.Event | None = None,
) -> RunResult:
    """Open loop when `rate` is given, closed loop when `concurrency` is; never both.

    Setting `stop` ends the sending early (in-flight requests still get the drain timeout);
    the result then covers the span that ran and says when it was interrupted.
    """
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
    check_bounds(duration_s, max_requests)
    start = time.perf_counter()
    schedule_s: float | None = None
    if rate is not None:
        offsets = arrival_offsets(arrivals, rate, duration_s, max_requests, seed)
        schedule_s = duration_s
        if offsets and len(offsets) >= max_requests:
            schedule_s = min(duration_s, offsets[-1] + 1.0 / rate)
        items = workload.take(len(offsets))
        sending = run_open_loop(
            caller,
            items,
            offsets,
            drain_timeout_s=drain_timeout_s,
            max_in_flight=max_in_flight,
            on_done=on_done,
            stop=stop,
        )
        mode: Literal["open", "closed"] = "open"
    else:
        assert concurrency is not None
        sending = run_closed_loop(
            caller,
            workload,
            concurrency,
            duration_s,
            max_requests,
            drain_timeout_s=drain_timeout_s,
            on_done=on_done,
            stop=stop,
        )
        mode = "closed"
    watch = asyncio.create_task(_set_at(stop)) if stop is not None else None
    begun = time.perf_counter()  # the loops' t0 follows within microseconds
    records = await sending
    if mode == "closed" and len(records) >= max_requests:
        # The count ended the claims: a closed loop sends as its answers come, so its span
        # of sending is until its last answer, not the duration bound (which would spread
        # a second's requests over all of it).
        schedule_s = min(duration_s, max(r.done for r in records))
    interrupted_at: float | None = None
    if watch is not None and stop is not None and stop.is_set():
        # The watcher may not have run yet when the event was set as the run ended.
        interrupted_at = (watch.result() if watch.done() else time.perf_counter()) - begun
        schedule_s = min(schedule_s or duration_s, interrupted_at)
    if watch is not None:
        watch.cancel()
    elapsed = time.perf_counter() - start
    if records:
        # Throughput is over the time the run took to finish its work, and in open loop at
        # least its arrival schedule, a quiet tail after the last arrival included (else a
        # short Poisson run would serve more req/s than arrived).
        elapsed = max(max(r.done for r in records), schedule_s or 0.0, 1e-9)
    records.sort(key=lambda r: r.intended)
    return RunResult(
        mode=mode,
        elapsed_s=elapsed,
        records=records,
        offered_rate=rate,
        arrivals=arrivals if rate is not None else None,
        concurrency=concurrency,
        duration_s=duration_s,
        max_requests=max_requests,
        schedule_s=schedule_s,
        interrupted_at_s=interrupted_at,
    )

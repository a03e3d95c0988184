"""Latency accounting: measured from the intended send time, so queueing cannot hide.

The "servers" here are fake async callables that are deliberately slow; they test the
generator's bookkeeping, not the inference service.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from loadtest.generator import (
    RequestRecord,
    RunResult,
    arrival_offsets,
    make_record,
    run_closed_loop,
    run_load,
    run_open_loop,
)
from loadtest.report import summarize
from loadtest.workload import CallOutcome, WorkItem, Workload

SERVICE_S = 0.05


class SerialServer:
    """Serves one request at a time, SERVICE_S each: excess load queues inside it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.max_in_flight = 0
        self.in_flight = 0

    async def __call__(self, item: WorkItem) -> CallOutcome:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self.lock:
                await asyncio.sleep(SERVICE_S)
        finally:
            self.in_flight -= 1
        return CallOutcome(output_tokens=3, input_tokens=5)


def items(n: int, kind: str = "translate") -> list[WorkItem]:
    return [WorkItem(kind, f"verse {i}") for i in range(n)]  # type: ignore[arg-type]


def test_open_loop_latency_includes_server_queueing() -> None:
    # 100 req/s offered, 20 req/s served: request i waits for the i before it.
    n = 10
    offsets = arrival_offsets("constant", 100.0, 10.0, n)
    server = SerialServer()
    records = asyncio.run(run_open_loop(server, items(n), offsets))
    records.sort(key=lambda r: r.intended)
    assert len(records) == n and all(r.ok for r in records)
    for i, r in enumerate(records):
        assert r.intended == pytest.approx(i * 0.01, abs=0.02)
        # Completion cannot precede (i + 1) service times; latency counts from intended.
        assert r.done >= (i + 1) * SERVICE_S - 0.005
        assert r.latency == pytest.approx(r.done - r.intended)
    # The last one waited ~9 services in the queue: far above one service time.
    assert records[-1].latency >= (n * SERVICE_S - (n - 1) * 0.01) - 0.01
    assert server.max_in_flight > 1  # open loop kept sending while the server was busy


def test_open_loop_counts_client_stall_as_latency() -> None:
    # The first call blocks the event loop for 0.3 s: later requests leave late, and the
    # lateness is charged to them (a coordinated-omission client would report ~0 ms).
    stall = 0.3

    async def stalling(item: WorkItem) -> CallOutcome:
        if item.text == "verse 0":
            time.sleep(stall)  # blocks the loop on purpose
        return CallOutcome()

    offsets = arrival_offsets("constant", 100.0, 10.0, 10)
    records = asyncio.run(run_open_loop(stalling, items(10), offsets))
    late = [r for r in records if r.intended > 0.005]
    assert len(late) == 9
    for r in late:
        assert r.sent >= stall - 0.01
        assert r.lag >= stall - r.intended - 0.01
        assert r.latency >= r.lag
        assert r.latency >= stall - r.intended - 0.01


def test_stream_ttft_and_itl_from_intended_time() -> None:
    """A message of several tokens: its first waited the gap, the rest came with it (the
    server's ITL too); an even split would show a 0.3 s stall as three 0.1 s gaps."""
    t0 = 100.0
    outcome = CallOutcome(chunk_times=[100.5, 100.6, 100.9], chunk_tokens=[2, 1, 3])
    record = make_record(
        WorkItem("stream", "x"), outcome, t0, intended=100.2, sent=100.25, done=101.0
    )
    assert record.intended == pytest.approx(0.2)
    assert record.latency == pytest.approx(0.8)
    assert record.lag == pytest.approx(0.05)
    assert record.ttft == pytest.approx(0.3)
    assert record.itl == pytest.approx([0.0, 0.1, 0.3, 0.0, 0.0])
    assert record.messages == 3


def test_closed_loop_keeps_concurrency_and_count() -> None:
    server = SerialServer()
    workload = Workload(["a b c", "d e f g"], {"translate": 1.0}, seed=0)
    records = asyncio.run(run_closed_loop(server, workload, 3, 30.0, 12))
    assert len(records) == 12
    assert server.max_in_flight == 3
    # In a closed loop the intended time is when the worker became free; latency includes
    # the wait in the server's queue (2 others ahead at steady state).
    assert max(r.latency for r in records) >= 2 * SERVICE_S


def test_open_loop_run_stops_at_duration_and_cancels_hung_requests() -> None:
    async def hung(item: WorkItem) -> CallOutcome:
        await asyncio.sleep(3600)
        return CallOutcome()

    workload = Workload(["a"], {"translate": 1.0})
    start = time.perf_counter()
    result = asyncio.run(
        run_load(
            hung,
            workload,
            rate=50.0,
            arrivals="constant",
            duration_s=0.3,
            max_requests=1000,
            drain_timeout_s=0.2,
        )
    )
    took = time.perf_counter() - start
    assert took < 2.0
    assert len(result.records) == 15
    assert {r.code for r in result.records} == {"CLIENT_CANCELLED"}


def test_closed_loop_run_stops_with_hung_server() -> None:
    async def hung(item: WorkItem) -> CallOutcome:
        await asyncio.sleep(3600)
        return CallOutcome()

    workload = Workload(["a"], {"translate": 1.0})
    start = time.perf_counter()
    result = asyncio.run(
        run_load(
            hung,
            workload,
            rate=None,
            concurrency=4,
            duration_s=0.2,
            max_requests=100,
            drain_timeout_s=0.2,
        )
    )
    assert time.perf_counter() - start < 2.0
    assert len(result.records) == 4
    assert all(r.code == "CLIENT_CANCELLED" for r in result.records)


def test_run_stops_at_max_requests() -> None:
    async def fast(item: WorkItem) -> CallOutcome:
        return CallOutcome(output_tokens=1)

    workload = Workload(["a"], {"translate": 1.0})
    result = asyncio.run(run_load(fast, workload, rate=1000.0, duration_s=60.0, max_requests=25))
    assert len(result.records) == 25
    assert result.elapsed_s < 5.0


def _hung_run(n: int, max_in_flight: int) -> list[RequestRecord]:
    """n requests at 1000/s to a server that never answers, at most max_in_flight out."""

    async def hung(item: WorkItem) -> CallOutcome:
        await asyncio.sleep(3600)
        return CallOutcome()

    offsets = arrival_offsets("constant", 1000.0, 1.0, n)
    return asyncio.run(
        run_open_loop(hung, items(n), offsets, drain_timeout_s=0.05, max_in_flight=max_in_flight)
    )


def test_backlog_cap_records_errors_instead_of_growing() -> None:
    records = _hung_run(20, max_in_flight=5)
    codes = [r.code for r in records]
    assert codes.count("CLIENT_BACKLOG") == 15
    assert codes.count("CLIENT_CANCELLED") == 5


def test_errors_are_recorded_by_code() -> None:
    async def flaky(item: WorkItem) -> CallOutcome:
        if item.text.endswith(("1", "3")):
            return CallOutcome(code="RESOURCE_EXHAUSTED")
        if item.text.endswith("5"):
            raise RuntimeError("client bug")
        return CallOutcome()

    offsets = arrival_offsets("constant", 1000.0, 1.0, 6)
    records = asyncio.run(run_open_loop(flaky, items(6), offsets))
    codes = sorted(r.code for r in records)
    assert codes == ["CLIENT_ERROR", "OK", "OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]


def test_run_load_needs_exactly_one_mode() -> None:
    workload = Workload(["a"], {"translate": 1.0})

    async def fast(item: WorkItem) -> CallOutcome:
        return CallOutcome()

    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run_load(fast, workload, rate=1.0, concurrency=1))
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run_load(fast, workload, rate=None))


def test_a_client_that_falls_behind_is_reported_client_limited() -> None:
    # Each call blocks the event loop 20 ms: at most ~50 req/s leave against 100 offered.
    from loadtest.report import summarize

    async def blocking(item: WorkItem) -> CallOutcome:
        time.sleep(0.02)  # blocks the loop on purpose
        return CallOutcome()

    workload = Workload(["a b c"], {"translate": 1.0}, seed=0)
    result = asyncio.run(
        run_load(blocking, workload, rate=100.0, arrivals="constant", duration_s=0.3)
    )
    summary = summarize(result)
    assert summary["arrival_rate"] == pytest.approx(100.0)
    assert summary["sent_rate"] < 0.7 * summary["arrival_rate"]
    assert summary["client_limited"] is True


def test_open_loop_throughput_is_over_the_whole_window() -> None:
    # Constant 4 req/s for 0.7 s: sends at 0, 0.25 and 0.5 s, each answered at once. The
    # window is 0.7 s (3 arrivals in it, 4.3 req/s), so no more than that can be served;
    # over the last answer alone (~0.5 s) it would read 6 req/s.
    from loadtest.report import summarize

    async def fast(item: WorkItem) -> CallOutcome:
        return CallOutcome(output_tokens=2)

    workload = Workload(["a"], {"translate": 1.0})
    result = asyncio.run(run_load(fast, workload, rate=4.0, arrivals="constant", duration_s=0.7))
    summary = summarize(result)
    assert summary["requests"] == 3
    assert result.elapsed_s == pytest.approx(0.7)
    assert summary["throughput_rps"] == pytest.approx(3 / 0.7)
    assert summary["throughput_rps"] <= summary["arrival_rate"] + 1e-9
    assert summary["tokens_per_s"] == pytest.approx(6 / 0.7)


def test_backlog_errors_say_why() -> None:
    records = _hung_run(4, max_in_flight=2)
    backlog = [r for r in records if r.code == "CLIENT_BACKLOG"]
    assert len(backlog) == 2
    assert all("2 requests already in flight" in r.detail for r in backlog)


def test_rates_are_over_the_schedule_when_the_count_ends_it() -> None:
    # 100 req/s for up to 10 s, at most 50 requests: they arrive within 0.5 s, so 100 req/s
    # arrived and were sent (not 50 over the 10 s bound: 5 req/s).
    from loadtest.report import summarize

    async def fast(item: WorkItem) -> CallOutcome:
        return CallOutcome()

    workload = Workload(["a"], {"translate": 1.0})
    result = asyncio.run(
        run_load(fast, workload, rate=100.0, arrivals="constant", duration_s=10.0, max_requests=50)
    )
    summary = summarize(result)
    assert summary["arrival_rate"] == pytest.approx(100.0)
    assert summary["sent_rate"] == pytest.approx(100.0, rel=0.1)
    assert summary["throughput_rps"] == pytest.approx(100.0, rel=0.1)


async def answered_after_200_ms(item: WorkItem) -> CallOutcome:
    await asyncio.sleep(0.2)
    return CallOutcome(output_tokens=1)


def stopped_run(stop_after_s: float, **kwargs: Any) -> RunResult:
    """run_load with `stop` set stop_after_s into the run (what Ctrl-C does in the CLI)."""

    async def main() -> RunResult:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(stop_after_s, stop.set)
        workload = Workload(["a"], {"translate": 1.0})
        return await run_load(answered_after_200_ms, workload, stop=stop, **kwargs)

    return asyncio.run(main())


def test_stop_ends_the_arrivals_and_lets_in_flight_requests_finish() -> None:
    # Constant 20 req/s for up to 10 s, stopped 0.5 s in: the arrivals so far went out,
    # none after, and the ones in flight at the stop were answered (not cancelled).
    start = time.perf_counter()
    result = stopped_run(0.5, rate=20.0, arrivals="constant", duration_s=10.0)
    assert time.perf_counter() - start < 2.0
    stopped = result.interrupted_at_s
    assert stopped is not None
    assert stopped == pytest.approx(0.5, abs=0.1)
    records = result.records
    assert all(r.ok for r in records)
    assert all(r.intended <= stopped for r in records)
    assert len(records) >= int(stopped * 20) - 1
    assert max(r.done for r in records) > stopped
    # The rates are over the 0.5 s that ran, not the 10 s bound.
    assert result.schedule_s == stopped
    summary = summarize(result)
    assert summary["interrupted_at_s"] == stopped
    assert summary["arrival_rate"] == pytest.approx(len(records) / stopped)
    assert summary["arrival_rate"] == pytest.approx(20.0, rel=0.25)
    assert summary["throughput_rps"] == pytest.approx(len(records) / result.elapsed_s)
    assert result.elapsed_s == pytest.approx(max(r.done for r in records))


def test_stop_ends_the_closed_loop_claims_and_lets_in_flight_requests_finish() -> None:
    # 3 workers, answers after 0.2 s, stopped 0.3 s in: the requests then in flight are
    # answered, and no worker claims another.
    start = time.perf_counter()
    result = stopped_run(0.3, rate=None, concurrency=3, duration_s=10.0)
    assert time.perf_counter() - start < 2.0
    stopped = result.interrupted_at_s
    assert stopped is not None
    assert stopped == pytest.approx(0.3, abs=0.1)
    records = result.records
    assert 3 <= len(records) <= 6 and all(r.ok for r in records)
    assert all(r.sent <= stopped for r in records)
    assert max(r.done for r in records) > stopped
    summary = summarize(result)
    assert summary["interrupted_at_s"] == stopped
    assert summary["sent_rate"] == pytest.approx(len(records) / stopped)


def test_a_closed_loop_its_count_ended_reports_the_rate_it_sent_at() -> None:
    # 2 workers, answers after 0.2 s, 10 requests within a 60 s bound: claims at 0, 0.2,
    # 0.4, 0.6 and 0.8 s, the last answer at 1.0 s: 10 req/s sent (not 10 over 60 s).
    result = asyncio.run(
        run_load(
            answered_after_200_ms,
            Workload(["a"], {"translate": 1.0}),
            rate=None,
            concurrency=2,
            duration_s=60.0,
            max_requests=10,
        )
    )
    assert result.schedule_s == pytest.approx(1.0, abs=0.1)
    summary = summarize(result)
    assert summary["sent_rate"] == pytest.approx(10.0, rel=0.15)
    assert summary["sent_rate"] == pytest.approx(summary["throughput_rps"], rel=0.15)


def test_without_stop_a_run_is_not_marked_interrupted() -> None:
    result = asyncio.run(
        run_load(
            answered_after_200_ms, Workload(["a"], {"translate": 1.0}), rate=10.0, duration_s=0.2
        )
    )
    assert result.interrupted_at_s is None
    assert summarize(result)["interrupted_at_s"] is None

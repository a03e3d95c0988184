"""The scheduler: batching, streaming, cancellation, deadlines, the bounded queue, static
mode, graceful stop and reload, on tiny exported models (CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.domain import (
    DeadlineExceeded,
    DeadlineUnmeetable,
    DecodingParams,
    FinishReason,
    InvalidArgument,
    ModelNotFound,
    QueueFull,
    ResponseTooLarge,
    SequenceRequest,
    SequenceResult,
    Task,
    TokenEvent,
    Unavailable,
)
from service.engine import Batch, BatchItem, Engine, EngineOptions, StepOutput, decode_all
from service.metrics import Metrics
from service.repository import ModelRepository, ModelVersion
from service.scheduler import (
    DEFAULT_MODELS,
    EngineFactory,
    Scheduler,
    SchedulerConfig,
    StepTimes,
)
from tests.service._engine_models import (
    LM,
    LONG_PROMPT,
    PROMPTS,
    SOURCES,
    TRANSLATOR,
    copy_version,
    hooked_engine_factory,
    model_repository,
    slow_decoder,
    slow_engine_factory,
)

pytestmark = pytest.mark.usefixtures("exported_models")


T = TypeVar("T")
OPTIONS = EngineOptions(cpu_variant="fp32", intra_op_threads=1, warmup=False)
STEP_DELAY = 0.02


def make_scheduler(
    root: Path | None = None, factory: EngineFactory | None = None, **config: Any
) -> Scheduler:
    base: dict[str, Any] = dict(
        max_batch_size=8, max_batch_tokens=4096, max_queue=16, max_input_tokens=128
    )
    base.update(config)
    repository = ModelRepository(root or model_repository(), DEFAULT_MODELS)
    return Scheduler(repository, SchedulerConfig(**base), OPTIONS, Metrics(), factory)


RUN_TIMEOUT_S = 60.0


class HeldSteps:
    """A `before_step` hook that holds every engine thread's steps until `release` is set
    (then each takes STEP_DELAY): a test can act while a loop is inside a step, instead of
    hoping the engine thread has taken its requests in by then. `stepping`: the engines
    (model names) that have begun a step."""

    def __init__(self) -> None:
        self.stepping: set[str] = set()
        self.release = threading.Event()

    def __call__(self, batch: Batch) -> None:
        self.stepping.add(batch.engine.name)
        self.release.wait(RUN_TIMEOUT_S)
        time.sleep(STEP_DELAY)


async def bounded(what: str, coroutine: Coroutine[Any, Any, T]) -> T:
    """`coroutine`'s result; AssertionError if it runs past RUN_TIMEOUT_S (a stall)."""
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S) as limit:
            return await coroutine
    except TimeoutError:
        if limit.expired():  # ours, not a TimeoutError the test raised itself
            raise AssertionError(
                f"{what} did not end within {RUN_TIMEOUT_S:.0f}s: something stalled"
            ) from None
        raise


def run(main: Callable[[Scheduler], Coroutine[Any, Any, T]], scheduler: Scheduler) -> T:
    """Start the scheduler, run `main`, always stop it (one event loop per test). A test
    whose main (or the stop after it) stalls fails after RUN_TIMEOUT_S instead of hanging
    the suite (a request never admitted, rows never freed)."""

    async def wrapper() -> T:
        await scheduler.start()
        try:
            return await bounded("the test", main(scheduler))
        finally:
            await bounded("Scheduler.stop", scheduler.stop(0.0))

    return asyncio.run(wrapper())


def translate(text: str, **params: Any) -> SequenceRequest:
    return SequenceRequest(Task.TRANSLATION, text, DecodingParams(**params))


def generate(text: str, within: float | None = None, **params: Any) -> SequenceRequest:
    """A generation request; `within`: its deadline, seconds from now."""
    deadline = None if within is None else time.monotonic() + within
    return SequenceRequest(Task.GENERATION, text, DecodingParams(**params), deadline=deadline)


def alone(request: SequenceRequest) -> SequenceResult:
    """The request decoded by itself, outside any scheduler."""
    name = TRANSLATOR if request.task is Task.TRANSLATION else LM
    path = model_repository() / name / "1"
    from export.manifest import load_manifest

    engine = Engine(path, load_manifest(path), OPTIONS)
    return decode_all(engine, [request])[0]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def loop_stats(s: Scheduler, key: str) -> dict[str, float]:
    return s.stats()[key]


def sample_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def long_request(**params: Any) -> SequenceRequest:
    return generate(LONG_PROMPT, max_new_tokens=100, **params)


# --- batching ----------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_equal_their_unbatched_answers() -> None:
    requests = [translate(t, max_new_tokens=30) for t in SOURCES]
    requests += [generate(p, max_new_tokens=30) for p in PROMPTS]
    requests.append(translate(SOURCES[0], max_new_tokens=20, beam_size=3, n_best=2))
    scheduler = make_scheduler()

    async def main(s: Scheduler) -> list[SequenceResult]:
        for name in (TRANSLATOR, LM):
            labels = {"model": name, "version": "1"}
            assert sample_value(s.metrics, "inference_model_ready", labels) == 1
        return list(await asyncio.gather(*(s.submit(r) for r in requests)))

    results = run(main, scheduler)
    for request, result in zip(requests, results, strict=True):
        expected = alone(request)
        assert [h.token_ids for h in result.hypotheses] == [
            h.token_ids for h in expected.hypotheses
        ]
        assert [h.text for h in result.hypotheses] == [h.text for h in expected.hypotheses]
        assert (result.model, result.version) == (
            TRANSLATOR if request.task is Task.TRANSLATION else LM,
            1,
        )
    m = scheduler.metrics
    for name in (TRANSLATOR, LM):  # some step ran more than one row, for both models
        steps = sample_value(m, "inference_batch_size_count", {"model": name})
        single = sample_value(m, "inference_batch_size_bucket", {"model": name, "le": "1.0"})
        assert steps > single
        assert sample_value(m, "inference_time_to_first_token_seconds_count", {"model": name}) > 0
        assert sample_value(m, "inference_queue_duration_seconds_count", {"model": name}) > 0
        assert sample_value(m, "inference_inter_token_latency_seconds_count", {"model": name}) > 0
        assert sample_value(m, "inference_input_tokens_total", {"model": name}) > 0
        assert sample_value(m, "inference_output_tokens_total", {"model": name}) > 0


def test_newcomers_are_encoded_while_the_batch_steps_and_answer_as_alone() -> None:
    """On the CPU the requests that arrive while others decode are encoded (or prefilled)
    in the loop's helper thread during a step, and join the batch at the step after: their
    answers equal their unbatched answers, and so do those of the requests running."""
    threads: list[str] = []
    held = HeldSteps()
    factory = hooked_engine_factory(
        held, before_prepare=lambda _: threads.append(threading.current_thread().name)
    )
    first = [translate(SOURCES[0], max_new_tokens=30), generate(PROMPTS[0], max_new_tokens=30)]
    later = [translate(t, max_new_tokens=12) for t in SOURCES[1:4]]
    later += [generate(p, max_new_tokens=12) for p in PROMPTS[1:4]]

    async def main(s: Scheduler) -> list[SequenceResult]:
        try:
            running = [asyncio.ensure_future(s.submit(r)) for r in first]
            # Each engine thread is inside a step of its first request. "running" alone
            # counts a request once it is posted to the engine thread, which may not have
            # woken yet: on a loaded machine the later ones came in the same round, into
            # an empty batch, and were encoded in the engine thread.
            await wait_until(lambda: held.stepping == {TRANSLATOR, LM})
            late = [asyncio.ensure_future(s.submit(r)) for r in later]
            # all posted to the engine threads, which take them in at their next round
            await wait_until(
                lambda: all(loop_stats(s, f"{n}:1")["running"] == 4 for n in (TRANSLATOR, LM))
            )
        finally:
            held.release.set()
        return list(await asyncio.gather(*running, *late))

    results = run(main, make_scheduler(factory=factory))
    for request, result in zip([*first, *later], results, strict=True):
        assert [h.token_ids for h in result.hypotheses] == [
            h.token_ids for h in alone(request).hypotheses
        ]
    for name in (TRANSLATOR, LM):  # the first came to an idle loop; some later ones not
        assert f"engine-{name}:1" in threads and f"admit-{name}:1" in "".join(threads)


def test_a_failed_encoding_of_newcomers_fails_them_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Newcomers whose encoding fails in the helper thread while the batch steps end with
    the error, named in the log; the request running goes on to its answer, and a later
    one is served."""

    def fail_the_doomed(items: Sequence[BatchItem]) -> None:
        ids = [item.request.request_id for item in items]
        if threading.current_thread().name.startswith("admit-") and "doomed-0" in ids:
            raise RuntimeError("encoder lost")

    held = HeldSteps()
    factory = hooked_engine_factory(held, before_prepare=fail_the_doomed)
    first = translate(SOURCES[0], max_new_tokens=30)
    doomed = replace(translate(SOURCES[1], max_new_tokens=10), request_id="doomed-0")
    after = translate(SOURCES[3], max_new_tokens=10)

    async def main(s: Scheduler) -> list[BaseException | SequenceResult]:
        try:
            running = asyncio.ensure_future(s.submit(first))
            # The engine thread is inside a step of `first` (see the test above: "running"
            # counts a request the engine thread may not have taken in yet), and the doomed
            # newcomer is posted to it, for its next round.
            await wait_until(lambda: TRANSLATOR in held.stepping)
            failing = asyncio.ensure_future(s.submit(doomed))
            await wait_until(lambda: loop_stats(s, f"{TRANSLATOR}:1")["running"] == 2)
        finally:
            held.release.set()
        [outcome] = await asyncio.gather(failing, return_exceptions=True)
        return [outcome, await running, await s.submit(after)]

    with caplog.at_level(logging.ERROR, logger="service.scheduler"):
        failed, answer, later = run(main, make_scheduler(factory=factory))
    assert isinstance(failed, RuntimeError) and str(failed) == "encoder lost"
    [line] = [r for r in caplog.records if "taking requests in failed" in r.getMessage()]
    assert line.__dict__["request_ids"] == ["doomed-0"]
    for request, result in ((first, answer), (after, later)):
        assert isinstance(result, SequenceResult)
        assert result.hypotheses[0].token_ids == alone(request).hypotheses[0].token_ids


def test_stream_pieces_add_up_to_the_unary_answer() -> None:
    requests = [generate(p, max_new_tokens=40) for p in PROMPTS[:4]]
    requests += [translate(t, max_new_tokens=40) for t in SOURCES[:3]]
    requests.append(translate(SOURCES[1], max_new_tokens=20, beam_size=2))

    async def main(s: Scheduler) -> list[tuple[list[TokenEvent | SequenceResult], SequenceResult]]:
        async def both(
            r: SequenceRequest,
        ) -> tuple[list[TokenEvent | SequenceResult], SequenceResult]:
            items = [item async for item in s.stream(r)]
            return items, await s.submit(r)

        return list(await asyncio.gather(*(both(r) for r in requests)))

    for items, unary in run(main, make_scheduler()):
        assert isinstance(items[-1], SequenceResult)
        assert all(isinstance(i, TokenEvent) for i in items[:-1])
        events = [i for i in items[:-1] if isinstance(i, TokenEvent)]
        h = unary.hypotheses[0]
        assert "".join(e.text for e in events) == h.text == items[-1].hypotheses[0].text
        assert [t for e in events for t in e.token_ids] == h.token_ids


def test_a_stream_that_fell_behind_gets_its_waiting_tokens_in_one_event() -> None:
    """Tokens decoded while the reader was away are joined, not sent one by one: the
    message count follows the reader's pace, and nothing is lost or reordered."""
    request = generate(PROMPTS[0], max_new_tokens=40)

    async def main(s: Scheduler) -> tuple[list[TokenEvent | SequenceResult], SequenceResult]:
        items: list[TokenEvent | SequenceResult] = []
        async with contextlib.aclosing(s.stream(request)) as stream:
            async for item in stream:
                items.append(item)
                if len(items) == 1:  # away while the rest is decoded
                    await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 0)
        return items, await s.submit(request)

    # Slow steps: the first event is read long before the row ends, even on a busy machine.
    items, unary = run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))
    events = [i for i in items if isinstance(i, TokenEvent)]
    ids = unary.hypotheses[0].token_ids
    assert len(ids) > 2, "the model stopped too early for this test"
    assert isinstance(items[-1], SequenceResult) and len(events) == 2
    assert [t for e in events for t in e.token_ids] == ids
    assert "".join(e.text for e in events) == unary.hypotheses[0].text


# --- cancellation, deadlines, queue ------------------------------------------------------------


def test_cancelled_request_frees_its_rows_at_the_next_step() -> None:
    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        task = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["rows"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        assert loop_stats(s, key)["rows"] == 0
        assert loop_stats(s, key)["steps"] < 60  # it did not run to its end

        # Closing a stream early cancels it too.
        stream = s.stream(long_request())
        first = await anext(stream)
        assert isinstance(first, TokenEvent)
        await stream.aclose()
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))


def test_a_request_cancelled_before_the_engine_took_it_leaves_at_the_next_step() -> None:
    """Admitted while the engine thread is inside a long step, then cancelled: its
    admission and its removal reach the engine thread together, and it still leaves."""
    slow = [False]
    sizes: list[int] = []
    in_slow_step = threading.Event()

    def step(batch: Batch) -> None:
        sizes.append(len(batch.seqs))
        if slow[0]:
            in_slow_step.set()
        time.sleep(0.4 if slow[0] else STEP_DELAY)

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        first = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=120)))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 2)
        slow[0] = True
        # the engine thread is inside a slow step now (an event: a fixed sleep may end
        # before it on a loaded machine)
        await wait_until(in_slow_step.is_set)
        second = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] == 2)  # admitted
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        slow[0] = False
        await wait_until(lambda: loop_stats(s, key)["running"] == 1, timeout=2.0)
        assert loop_stats(s, key)["rows"] == 1
        assert sizes.count(2) <= 1  # it joined at most the one step it was admitted to
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    run(main, make_scheduler(factory=hooked_engine_factory(step)))


def test_request_past_its_deadline_is_removed() -> None:
    """Admitted (expected to end in 5 steps), it runs long and is removed at its deadline."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        deadline = time.monotonic() + 0.3
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await s.submit(
                SequenceRequest(Task.GENERATION, LONG_PROMPT, DecodingParams(max_new_tokens=100),
                                deadline=deadline)
            )  # fmt: skip
        assert time.monotonic() - started < 1.0
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        # A stream's deadline ends the stream the same way.
        request = generate(LONG_PROMPT, within=0.3, max_new_tokens=100)
        with pytest.raises(DeadlineExceeded):
            async for _ in s.stream(request):
                pass
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)

    factory = slow_engine_factory(STEP_DELAY)
    run(main, make_scheduler(factory=factory, initial_length_ratio=0.05))


def test_full_queue_is_refused_at_once() -> None:
    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] == 1)
        queued = [asyncio.create_task(s.submit(long_request())) for _ in range(2)]
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 2)
        started = time.monotonic()
        with pytest.raises(QueueFull, match="max_queue 2") as refused:
            await s.submit(long_request())
        assert time.monotonic() - started < 0.5  # refused without waiting for room
        facts = {"model": LM, "version": "1", "max_queue": "2", "queued": "2"}
        assert refused.value.facts == facts
        for task in [running, *queued]:
            task.cancel()
        await asyncio.gather(running, *queued, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, key)["waiting"] + loop_stats(s, key)["running"] == 0)

    run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_size=1, max_queue=2)
    )


def test_a_burst_the_free_rows_take_is_not_refused_as_a_full_queue() -> None:
    """max_queue bounds the sequences waiting for room: a burst reaching a batch with free
    rows sits in the queue only until the loop's next pass. It counted there: of four
    calls at once, the third was refused ("2 sequences already waiting (max_queue 2)")
    with all 8 rows free, and so were two-text calls racing one another."""

    async def main(s: Scheduler) -> None:
        singles = await asyncio.gather(
            *(s.submit(generate(p, max_new_tokens=3)) for p in PROMPTS[:4])
        )
        assert all(result.hypotheses for result in singles)
        calls = [s.submit_all([generate(p, max_new_tokens=3)] * 2) for p in PROMPTS[:4]]
        for answers in await asyncio.gather(*calls):
            assert len(answers) == 2

    run(main, make_scheduler(max_batch_size=8, max_queue=2))


def test_a_multi_text_call_is_queued_whole_or_refused_and_only_admitted_input_counts() -> None:
    """submit_all: a call's texts all go in the queue at once, or none does (the message
    names the call's need), even when two calls race for the last places; a refused text
    withdraws the ones before it; input tokens count once a sequence joins a batch."""

    async def main(s: Scheduler) -> None:
        key, m = f"{LM}:1", s.metrics
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] == 1)
        counted = sample_value(m, "inference_input_tokens_total", {"model": LM})
        assert counted > 0
        queued = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 1)
        with pytest.raises(
            QueueFull,
            match="this call's 3 texts need as many queue places and 2 of max_queue 3 are free",
        ):
            await s.submit_all([long_request()] * 3)
        assert loop_stats(s, key)["waiting"] == 1  # none of its texts was queued
        # Two calls racing for the 2 places left: one is queued whole, one refused whole.
        calls = [asyncio.create_task(s.submit_all([long_request()] * 2)) for _ in range(2)]
        await wait_until(lambda: any(c.done() for c in calls))
        refused = next(c for c in calls if c.done())
        with pytest.raises(QueueFull, match="this call's 2 texts need as many queue places"):
            refused.result()
        assert loop_stats(s, key)["waiting"] == 3  # the other call's two, and `queued`
        accepted = next(c for c in calls if c is not refused)
        accepted.cancel()
        await asyncio.gather(accepted, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 1)
        # A text the model refuses withdraws the texts queued before it.
        with pytest.raises(InvalidArgument, match="tokens exceed max_input_tokens") as info:
            await s.submit_all([long_request(), generate("word " * 200, max_new_tokens=5)])
        assert info.value.index == 1
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 1)
        assert sample_value(m, "inference_input_tokens_total", {"model": LM}) == counted
        queued.cancel()  # leaves the queue never admitted: its input never counted
        await asyncio.gather(queued, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 0)
        assert sample_value(m, "inference_input_tokens_total", {"model": LM}) == counted
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_size=1, max_queue=3)
    )


def test_what_check_raises_for_a_text_fails_the_call_and_cancels_the_texts_left() -> None:
    """submit_all's `check` sees each result as it comes (the transport refuses an answer
    over the max message size there): what it raises fails the call at once, and the
    texts still running or queued leave instead of being decoded for nothing."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        seen: list[int] = []

        def check(i: int, result: SequenceResult) -> None:
            seen.append(i)
            raise ResponseTooLarge(f"text {i}: {result.output_tokens} tokens")

        requests = [generate(PROMPTS[0], max_new_tokens=1), long_request(), long_request()]
        started = time.monotonic()
        with pytest.raises(ResponseTooLarge, match="text 0: 1 tokens"):
            await s.submit_all(requests, check)
        assert seen == [0]
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 0)
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        # Each long text would take 100 steps of STEP_DELAY: none ran to its end.
        assert loop_stats(s, key)["steps"] < 50
        assert time.monotonic() - started < 100 * STEP_DELAY

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_size=1))


def test_the_wait_gauge_sees_a_full_token_budget() -> None:
    """Rows are free but long requests hold the token budget: the gauge estimates for a
    request like the recent ones, which waits for one of them to end, not for the step in
    flight alone (as a request costing no tokens would)."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        tasks = [asyncio.create_task(s.submit(long_request())) for _ in range(3)]
        await wait_until(lambda: loop_stats(s, key)["running"] == 3)
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 3)
        stats = loop_stats(s, key)
        assert stats["rows"] == 3 and stats["waiting"] == 0  # 5 of 8 rows free
        assert stats["estimated_wait_s"] > 10 * stats["step_s"]
        gauge = sample_value(
            s.metrics, "inference_estimated_queue_wait_seconds", {"model": LM, "version": "1"}
        )
        assert gauge > 10 * stats["step_s"]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # each long request counts about 110 tokens: three fill a budget of 340
    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_tokens=340))


def test_unmeetable_deadline_is_refused_with_the_estimate() -> None:
    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 3)
        assert loop_stats(s, key)["estimated_wait_s"] > 0.2
        tight = generate(PROMPTS[0], within=0.05, max_new_tokens=5)
        with pytest.raises(
            DeadlineUnmeetable,
            match=r"refused at admission: .* estimated queue wait .*s .*exceed the .*s left",
        ) as refused:
            await s.submit(tight)
        facts = refused.value.facts
        assert (facts["model"], facts["version"]) == (LM, "1")
        assert float(facts["estimated_seconds"]) > float(facts["time_left_seconds"]) > 0
        generous = generate(PROMPTS[0], within=60, max_new_tokens=5)
        accepted = asyncio.create_task(s.submit(generous))
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 1)
        running.cancel()
        result = await accepted
        assert result.hypotheses
        with contextlib.suppress(asyncio.CancelledError):
            await running

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY, timed=True), max_batch_size=1))


def test_a_deadline_shorter_than_a_step_is_exceeded_not_shed() -> None:
    """On an idle server a deadline shorter than one decode step cannot be met whatever the
    load: DeadlineExceeded saying so, not the load-shedding DeadlineUnmeetable."""

    async def main(s: Scheduler) -> None:
        assert loop_stats(s, f"{LM}:1")["running"] == 0
        tight = generate(PROMPTS[0], within=0.001, max_new_tokens=5)
        with pytest.raises(DeadlineExceeded, match="less than one decode step take on an idle"):
            async for _ in s.stream(tight):
                pass
        tight = replace(tight, deadline=time.monotonic() + 0.001)
        with pytest.raises(
            DeadlineExceeded, match="less than one decode step and its admission"
        ) as refused:
            await s.submit(tight)
        facts = refused.value.facts
        assert facts["admitted"] == "false"  # no work was spent on it
        assert float(facts["least_seconds"]) > float(facts["time_left_seconds"])

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))


def test_step_times_are_learnt_by_row_bucket() -> None:
    """Steps of one row do not move the estimate of a full batch's; rows between buckets
    read their bucket's; more rows never read faster; a knot's first steps are averaged,
    then followed by an EWMA; a fresh batch reads no slower than its warm-up timing;
    admissions cost per token."""
    times = StepTimes({1: 0.002, 2: 0.003, 4: 0.005, 8: 0.010}, 0.0, alpha=0.2)
    for _ in range(20):
        times.observe(1, 0.001)
    assert times(1) == pytest.approx(0.001, rel=1e-3)
    assert times(8) == times(5) == 0.010  # 5 rows run as 8
    times.observe(6, 0.02)  # a step computing 6 rows, in the 8-row bucket
    assert times(8) == times(5) == 0.02 and times(4) == 0.005
    times.observe(2, 0.2)  # a slow 2-row step (another model's step beside it)
    assert times.seconds[2] == 0.2  # the first replaces the prior ...
    assert times(2) == times(4) == times(8) == 0.02  # ... fewer rows read no slower
    times.observe(2, 0.1)
    times.observe(2, 0.3)
    assert times.seconds[2] == pytest.approx(0.2)  # a mean while a knot's steps are few ...
    for _ in range(60):
        times.observe(2, 0.004)
    assert times.seconds[2] == pytest.approx(0.004, rel=1e-3)  # ... then an EWMA
    times.observe(2, 0.002)
    assert times.seconds[2] == pytest.approx(0.8 * 0.004 + 0.2 * 0.002, rel=1e-3)
    assert times(2) == times.seconds[2]
    times.observe(2, 0.2)
    assert times(2, fresh=True) == 0.003  # a fresh batch: no slower than at warm-up
    assert times(0) == times(1) and times(100) == times(8)
    assert times.admission(100) == 0.0
    times.observe_admission(100, 0.1)  # 1 ms a token
    assert times.admission(50) == pytest.approx(0.05)
    assert times.admission_share == 0.0  # no round took anyone in
    busy = StepTimes({1: 0.01}, 0.0, alpha=0.2)
    for _ in range(50):
        busy.observe(1, 0.01, admitted=0.003)
    assert busy.admission_share == pytest.approx(0.3)
    for _ in range(5):  # a burst's tail, nobody left to take in, hardly moves it
        busy.observe(1, 0.01)
    assert 0.25 < busy.admission_share < 0.3


def test_a_lone_stalled_step_hardly_moves_the_estimate_a_lasting_slowdown_does() -> None:
    """One step ten times slower than the others (the OS took the core) counts as twice
    the estimate: unclipped it tripled the estimate and admission refused requests it
    would have served in half their deadline. Steps that stay slower still move it."""
    times = StepTimes({32: 0.012}, 0.0, alpha=0.2)
    for _ in range(30):
        times.observe(32, 0.012)
    times.observe(32, 0.136)
    assert times(32) == pytest.approx(0.012 * 1.2)
    for _ in range(20):
        times.observe(32, 0.040)
    assert times(32) == pytest.approx(0.040, rel=0.05)


def test_short_inputs_do_not_teach_the_admission_time_of_long_ones() -> None:
    """A round taking in a 1-token input takes the encoder's (or prefill's) fixed cost:
    learnt per token, it read a 200-token input's admission several times too slow, and an
    idle server refused as DEADLINE_EXCEEDED calls it answered in a fraction of their
    deadline (none admitted to learn otherwise). Only rounds of many tokens teach it."""
    times = StepTimes({1: 0.002}, 0.0001, alpha=0.2)
    times.observe_admission(200, 0.02)
    for _ in range(10):
        times.observe_admission(1, 0.0017)  # en-es/en-lm on this project's CPU
    assert times.admission(200) == pytest.approx(0.02)
    times.observe_admission(100, 1.0)  # a slow round (another model's step beside it)
    assert times.admission(100) > 0.1
    assert times.admission(100, fresh=True) == pytest.approx(0.01)  # the least: warm-up's


def _rows_timed_engine(seconds_per_row: float) -> EngineFactory:
    """Steps take `seconds_per_row` × their rows (timed), as on a CPU, where a full
    batch's step takes several times a lone row's."""
    return hooked_engine_factory(lambda batch: time.sleep(seconds_per_row * batch.rows), True)


def test_a_burst_after_light_load_is_estimated_at_full_batch_step_times() -> None:
    """After a spell of 1-row steps, a request queued behind a full batch is estimated at
    the full batch's step time, which the spell did not average away: one step-time
    average read 1-row steps there, admitted a deadline about 8 times too short, and the
    request expired in the queue."""

    async def fill(s: Scheduler, count: int) -> list[asyncio.Task[SequenceResult]]:
        tasks = [asyncio.create_task(s.submit(long_request())) for _ in range(count)]
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == count)
        return tasks

    async def cancel(s: Scheduler, tasks: list[asyncio.Task[SequenceResult]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 0)

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        loop = s._loops[key]
        full = await fill(s, 8)  # learn the 8-row step: about 40 ms
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 10)
        await cancel(s, full)
        lone = await fill(s, 1)  # then 1-row steps: about 5 ms
        steps = loop_stats(s, key)["steps"]
        await wait_until(lambda: loop_stats(s, key)["steps"] >= steps + 25)
        await cancel(s, lone)
        assert loop.step_times(1) < 0.02 and loop.step_times(8) > 0.03
        burst = await fill(s, 8)
        # 8 rows running, each expected to take about 50 steps more: a newcomer waits
        # about 50 × 40 ms, which 1-row steps would have read as about 0.25 s.
        assert loop_stats(s, key)["estimated_wait_s"] > 1.0
        with pytest.raises(DeadlineUnmeetable, match="estimated queue wait"):
            await s.submit(generate(PROMPTS[0], within=0.8, max_new_tokens=4))
        await cancel(s, burst)

    run(main, make_scheduler(factory=_rows_timed_engine(0.005), max_batch_size=8))


def test_a_unary_call_that_cannot_decode_in_time_is_refused_and_a_stream_is_not() -> None:
    """A unary call expected to decode for longer than its deadline behind a running
    request is refused at once (it would expire with nothing to show, its wait is short,
    but the steps it would share are slower): DeadlineUnmeetable. A stream with the same
    deadline is served the tokens it has time for."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        request = generate(LONG_PROMPT, within=0.3, max_new_tokens=100)  # 50 steps expected
        tokens = 0
        with pytest.raises(DeadlineExceeded):
            async for event in s.stream(request):
                if isinstance(event, TokenEvent):
                    tokens += len(event.token_ids)
        assert tokens > 0
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        steps = loop_stats(s, key)["steps"]
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= steps + 5)
        # idle, 50 steps at the warm-up's 10 ms fit 0.8 s; shared, 50 at 20 ms do not
        with pytest.raises(DeadlineUnmeetable, match=r"and \S+ for its expected 50 decode"):
            await s.submit(replace(request, deadline=time.monotonic() + 0.8))
        stream = s.stream(replace(request, deadline=time.monotonic() + 0.8))
        assert isinstance(await anext(stream), TokenEvent)
        await stream.aclose()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY, timed=True)))


def test_a_cold_idle_server_serves_a_generation_its_expected_length_does_not_fit() -> None:
    """Before any generation has finished, one is expected to run half its max_new_tokens;
    on an idle server that guess refused, as DEADLINE_EXCEEDED (no replica could answer),
    a call that ends at its EOS in a fraction of its deadline, and every such call after it
    (none admitted, nothing learnt). An idle loop admits it: its rows are nobody's."""
    request = generate(PROMPTS[1], max_new_tokens=80)
    solo = alone(request)
    assert len(solo.hypotheses[0].token_ids) < 20  # EOS long before 0.5 x 80

    async def main(s: Scheduler) -> SequenceResult:
        loop = s._loops[f"{LM}:1"]
        expected = 40 * loop.step_times(1, fresh=True)  # 0.5 x 80 steps at 10 ms
        return await s.submit(replace(request, deadline=time.monotonic() + expected * 0.75))

    result = run(main, make_scheduler())
    assert result.hypotheses[0].token_ids == solo.hypotheses[0].token_ids


def test_an_idle_loop_admits_a_multi_text_call_whatever_its_stale_step_times() -> None:
    """A slow 2-row step (another model's step beside it) is all the loop knows of 2 rows
    once idle: a multi-text call finding the loop idle is admitted, every text (the ones
    after the first wait beside it, not behind another call). Its texts after the first
    were estimated at the slow step and refused, and so was every such call after it (no
    2-row step ran to learn from)."""
    slow = [True]

    def step(_: Batch) -> None:
        time.sleep(0.3 if slow[0] else 0.0)

    async def main(s: Scheduler) -> list[SequenceResult]:
        await s.submit_all([translate(SOURCES[2], max_new_tokens=1)] * 2)
        times = s._loops[f"{TRANSLATOR}:1"].step_times
        assert times(2) >= 0.3  # no larger knot seen to read less
        slow[0] = False
        request = replace(translate(SOURCES[2], max_new_tokens=2), deadline=time.monotonic() + 0.2)
        return await s.submit_all([request] * 2)

    results = run(main, make_scheduler(factory=hooked_engine_factory(step, timed=True)))
    assert [len(r.hypotheses) for r in results] == [1, 1]


def test_static_hold_refuses_a_call_its_batch_would_hold_past_its_deadline() -> None:
    """In a HOLDING mode an answer leaves with its batch's last: a short call joining a long
    one is estimated to the long one's end and refused at admission, instead of being
    admitted on its own few steps and expiring while its answer was held."""

    async def main(s: Scheduler) -> None:
        # Queued in the same pass of the event loop: they form one batch.
        long = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=40)))
        short = asyncio.create_task(s.submit(generate(PROMPTS[1], within=0.1, max_new_tokens=2)))
        with pytest.raises(DeadlineUnmeetable, match="for its expected 20 decode steps"):
            await short
        await long

    factory = slow_engine_factory(STEP_DELAY, timed=True)
    run(main, make_scheduler(factory=factory, mode="static-hold"))


def test_a_request_running_past_the_typical_length_counts_to_its_limit() -> None:
    """The running request has outrun the typical output length: the estimate waits for
    its max_new_tokens, so a deadline it would outlast is refused at admission instead of
    expiring in the queue behind it."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        running = asyncio.create_task(s.submit(long_request()))  # typical length: 5 steps
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 10)
        with pytest.raises(DeadlineUnmeetable, match="estimated queue wait"):
            await s.submit(generate(PROMPTS[0], within=0.5, max_new_tokens=5))
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    factory = slow_engine_factory(STEP_DELAY, timed=True)
    run(main, make_scheduler(factory=factory, max_batch_size=1, initial_length_ratio=0.05))


def test_a_cold_translator_expects_outputs_as_long_as_their_sources() -> None:
    """Before any translation has finished, the estimate expects each one ahead to run
    about as many steps as its source has tokens (a verse's translation is about as long
    as the verse), not half its max_new_tokens: short verses asked with max_new_tokens
    128 were each expected to take 64 steps, and a deadline that a few of them fit in
    was refused as unmeetable on a cold server."""
    request = translate(SOURCES[2], max_new_tokens=128)
    solo = alone(request)
    steps = len(solo.hypotheses[0].token_ids) + 1  # with its EOS step
    ratio = SchedulerConfig().initial_translation_ratio
    assert steps < 5 and ratio * solo.input_tokens < 15  # expected and real: short
    release = threading.Event()

    async def main(s: Scheduler) -> None:
        key = f"{TRANSLATOR}:1"
        loop = s._loops[key]
        ahead = [asyncio.create_task(s.submit(request)) for _ in range(4)]
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 3)
        # Nothing has finished (the first step waits for `release`), so step_s is fixed:
        # 4 x 15 + 1 steps fit the deadline, 4 x 64 + 1 would not.
        deadline = time.monotonic() + 100 * loop.step_s
        probe = asyncio.create_task(s.submit(replace(request, deadline=deadline)))
        try:
            await wait_until(lambda: probe.done() or loop_stats(s, key)["waiting"] == 4)
            if probe.done():  # refused at admission: the estimate's error is the failure
                probe.result()
        finally:
            release.set()
        for result in await asyncio.gather(probe, *ahead):
            assert result.hypotheses[0].token_ids == solo.hypotheses[0].token_ids
        assert time.monotonic() <= deadline

    factory = hooked_engine_factory(lambda _: release.wait(RUN_TIMEOUT_S))
    run(main, make_scheduler(factory=factory, max_batch_size=1))


def test_a_slow_batch_that_ended_leaves_no_step_time_refusing_short_deadlines() -> None:
    """The step-time EWMA moves only when steps run: once a slow batch has ended, a deadline
    shorter than its steps but ample for a fresh batch is admitted, not refused as shorter
    than a step for good (nothing admitted, nothing to lower the estimate)."""
    slow = [True]

    def step(_: Batch) -> None:
        time.sleep(0.3 if slow[0] else 0.0)

    async def main(s: Scheduler) -> None:
        await s.submit(generate(PROMPTS[0], max_new_tokens=1))
        assert loop_stats(s, f"{LM}:1")["step_s"] >= 0.3
        slow[0] = False
        result = await s.submit(generate(PROMPTS[0], within=0.2, max_new_tokens=2))
        assert result.hypotheses

    run(main, make_scheduler(factory=hooked_engine_factory(step, timed=True), ewma_alpha=1.0))


def test_a_deadline_the_token_budget_cannot_meet_is_refused_at_admission() -> None:
    """Rows are free but max_batch_tokens is not: the estimate waits for the running
    request's tokens, so a tight deadline is refused instead of expiring in the queue."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 3)
        # A stream: its own decode time does not count, only its wait for the tokens.
        big = generate(PROMPTS[0], within=0.2, max_new_tokens=120)
        with pytest.raises(DeadlineUnmeetable, match=r"estimated queue wait \S+ exceed"):
            async for _ in s.stream(big):
                pass
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    factory = slow_engine_factory(STEP_DELAY, timed=True)
    run(main, make_scheduler(factory=factory, max_batch_tokens=200))


def test_static_mode_runs_a_batch_to_completion_before_admitting_more() -> None:
    first = [generate(p, max_new_tokens=20) for p in PROMPTS[:3]]
    late = generate(PROMPTS[4], max_new_tokens=20)

    async def main(s: Scheduler) -> tuple[list[float], float, list[SequenceResult]]:
        done: dict[int, float] = {}

        async def timed(i: int, r: SequenceRequest) -> SequenceResult:
            result = await s.submit(r)
            done[i] = time.monotonic()
            return result

        tasks = [asyncio.create_task(timed(i, r)) for i, r in enumerate(first)]
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 3)
        tasks.append(asyncio.create_task(timed(3, late)))
        results = list(await asyncio.gather(*tasks))
        return [done[i] for i in range(3)], done[3], results

    firsts, late_done, results = run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), mode="static")
    )
    assert late_done > max(firsts)
    for request, result in zip([*first, late], results, strict=True):
        assert result.hypotheses[0].token_ids == alone(request).hypotheses[0].token_ids


def test_an_unset_max_new_tokens_is_lowered_to_fit_the_model() -> None:
    """The server's default is lowered to the positions a long prompt leaves; the same
    value set by the caller is refused, naming the limit."""
    prompt = " ".join(["And God said"] * 5)

    async def main(s: Scheduler) -> tuple[SequenceResult, str, int]:
        engine = s._loops[f"{LM}:1"].engine
        room = engine.max_positions - len(engine.encode(prompt)) + 1
        default = DecodingParams(max_new_tokens=120, max_new_tokens_default=True)
        result = await s.submit(SequenceRequest(Task.GENERATION, prompt, default))
        with pytest.raises(InvalidArgument) as refused:
            await s.submit(generate(prompt, max_new_tokens=120))
        return result, str(refused.value), room

    result, refusal, room = run(main, make_scheduler(max_new_tokens=128))
    assert 1 <= room < 120
    assert len(result.hypotheses[0].token_ids) <= room
    assert f"max_positions 128: at most {room} for this prompt" in refusal


def test_an_unset_max_new_tokens_is_lowered_to_fit_the_token_budget() -> None:
    """The server's default is lowered to what max_batch_tokens holds after the input (and
    its beams); the same value set by the caller is refused, naming the budget."""
    prompt = PROMPTS[0]

    async def main(s: Scheduler) -> tuple[SequenceResult, str, int]:
        inputs = len(s._loops[f"{LM}:1"].engine.encode(prompt))
        default = DecodingParams(max_new_tokens=100, max_new_tokens_default=True, beam_size=2)
        result = await s.submit(SequenceRequest(Task.GENERATION, prompt, default))
        with pytest.raises(InvalidArgument) as refused:
            await s.submit(generate(prompt, max_new_tokens=100, beam_size=2))
        return result, str(refused.value), 60 // 2 - inputs

    result, refusal, room = run(main, make_scheduler(max_batch_tokens=60))
    assert 1 <= room < 100
    assert len(result.hypotheses[0].token_ids) <= room
    assert refusal.startswith("options.max_new_tokens:") and "max_batch_tokens 60" in refusal


@pytest.mark.parametrize("mode", ["static-hold", "static-padded"])
def test_static_hold_answers_a_batch_together_when_it_ends(mode: str) -> None:
    """static-padded too, which also computes the finished rows to the batch's end."""
    batch = [generate(p, max_new_tokens=n) for p, n in zip(PROMPTS[:3], (1, 8, 24), strict=True)]

    async def main(s: Scheduler) -> tuple[list[float], list[int], list[SequenceResult]]:
        done: dict[int, float] = {}
        held: list[int] = []

        async def timed(i: int, r: SequenceRequest) -> SequenceResult:
            result = await s.submit(r)
            done[i] = time.monotonic()
            held.append(int(loop_stats(s, f"{LM}:1")["held"]))
            return result

        results = await asyncio.gather(*(timed(i, r) for i, r in enumerate(batch)))
        return [done[i] for i in range(3)], held, list(results)

    scheduler = make_scheduler(factory=slow_engine_factory(STEP_DELAY), mode=mode)
    done, held, results = run(main, scheduler)
    # One delivery: without holding, the answers would leave 7 and 23 steps apart.
    assert max(done) - min(done) < 3 * STEP_DELAY
    assert held == [0, 0, 0]  # nothing was left held once the answers went out
    for request, result in zip(batch, results, strict=True):
        assert result.hypotheses[0].token_ids == alone(request).hypotheses[0].token_ids
    # 3 rows in a batch of 4: padded, the lone long row's last 16 steps ran all 4 rows
    # (padding 3/4 each); compacted, they ran 1 row.
    registry = scheduler.metrics.registry
    labels = {"model": "en-lm"}
    steps = registry.get_sample_value("inference_batch_padding_ratio_count", labels)
    padding = registry.get_sample_value("inference_batch_padding_ratio_sum", labels)
    assert steps and steps >= 24 and padding is not None
    if mode == "static-padded":
        assert padding >= 16 * 0.75
    else:
        assert padding <= 8 * 0.75


def _capacity_timed_engine(seconds_per_row: float) -> EngineFactory:
    """Steps take `seconds_per_row` × the rows they compute (timed), padding included."""
    return hooked_engine_factory(lambda batch: time.sleep(seconds_per_row * batch.capacity), True)


def test_static_padded_times_its_steps_at_the_rows_it_computes() -> None:
    """A padded batch's tail steps compute every row, finished ones as padding: they are
    timed at all its rows, not at the live ones (a 1-row step read 7 times too slow)."""

    async def main(s: Scheduler) -> tuple[float, float]:
        short = generate(PROMPTS[1], max_new_tokens=2)
        await asyncio.gather(s.submit(long_request()), *(s.submit(short) for _ in range(7)))
        loop = s._loops[f"{LM}:1"]
        return loop.step_times(1), loop.step_times(8)

    one, eight = run(
        main, make_scheduler(factory=_capacity_timed_engine(0.004), mode="static-padded")
    )
    assert one < eight / 2


def test_static_hold_a_held_answer_cancelled_meanwhile_ends_at_once() -> None:
    short, long = generate(PROMPTS[0], max_new_tokens=1), generate(PROMPTS[1], max_new_tokens=40)
    later = generate(PROMPTS[2], max_new_tokens=2)
    key = f"{LM}:1"

    async def main(s: Scheduler) -> tuple[bool, SequenceResult, SequenceResult]:
        waiting_short = asyncio.create_task(s.submit(short))
        running_long = asyncio.create_task(s.submit(long))
        await wait_until(lambda: loop_stats(s, key)["held"] == 1)
        waiting_short.cancel()
        await wait_until(lambda: loop_stats(s, key)["held"] == 0)
        still_running = loop_stats(s, key)["running"] == 1 and not running_long.done()
        result = await running_long
        return still_running, result, await s.submit(later)

    still_running, result, after = run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), mode="static-hold")
    )
    assert still_running  # the cancelled answer ended without waiting for the batch
    assert result.hypotheses[0].token_ids == alone(long).hypotheses[0].token_ids
    assert after.hypotheses[0].token_ids == alone(later).hypotheses[0].token_ids


def test_static_hold_a_held_answer_goes_out_when_a_stop_cuts_the_batch() -> None:
    """A stop past its grace cuts the batch: the held answer is whole and goes out, the
    unfinished one is refused UNAVAILABLE (retried elsewhere)."""
    short, long = generate(PROMPTS[0], max_new_tokens=1), generate(PROMPTS[1], max_new_tokens=40)
    key = f"{LM}:1"

    async def main(s: Scheduler) -> list[SequenceResult | BaseException]:
        calls = [asyncio.create_task(s.submit(r)) for r in (short, long)]
        await wait_until(lambda: loop_stats(s, key)["held"] == 1)
        await s.stop(0.0)
        return list(await asyncio.gather(*calls, return_exceptions=True))

    held, cut = run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), mode="static-hold")
    )
    assert isinstance(held, SequenceResult), held
    assert held.hypotheses[0].token_ids == alone(short).hypotheses[0].token_ids
    assert isinstance(cut, Unavailable) and cut.reason == "draining", cut


def test_an_engine_failure_fails_its_requests_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step that raises fails the requests in its batch (not the queued ones) and leaves
    the worker decoding later requests in a fresh batch; its log line names them."""
    failures = [RuntimeError("device lost")]

    def fail_once_at_the_third_step(batch: Batch) -> None:
        time.sleep(STEP_DELAY)
        if batch.generated(next(iter(batch.seqs))) == 2 and failures:
            raise failures.pop()

    factory = hooked_engine_factory(fail_once_at_the_third_step)
    doomed = [
        replace(generate(p, max_new_tokens=20), request_id=f"doomed-{i}")
        for i, p in enumerate(PROMPTS[:2])
    ]
    later = generate(PROMPTS[3], max_new_tokens=20)

    async def main(s: Scheduler) -> tuple[list[BaseException | SequenceResult], SequenceResult]:
        outcomes = await asyncio.gather(*(s.submit(r) for r in doomed), return_exceptions=True)
        assert loop_stats(s, f"{LM}:1")["running"] == 0  # their rows are free again
        return outcomes, await s.submit(later)

    with caplog.at_level(logging.ERROR, logger="service.scheduler"):
        outcomes, answer = run(main, make_scheduler(factory=factory))
    assert [str(o) for o in outcomes] == ["device lost", "device lost"]
    [line] = [r for r in caplog.records if "engine step failed" in r.getMessage()]
    assert line.__dict__["request_ids"] == ["doomed-0", "doomed-1"]
    assert answer.hypotheses[0].token_ids == alone(later).hypotheses[0].token_ids


def test_a_stop_right_after_the_last_answer_cancels_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The loop marks itself idle on its next pass: a stop(0) before it must not warn that
    it cancels requests still running when none is."""

    async def main(s: Scheduler) -> None:
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).hypotheses
        await s.stop(0.0)

    with caplog.at_level(logging.WARNING, logger="service.scheduler"):
        run(main, make_scheduler())
    assert "cancelling" not in caplog.text, caplog.text


@pytest.mark.parametrize("failing_for_s", [0.0, 60.0])
def test_an_engine_whose_every_step_fails_stops_its_version(
    monkeypatch: pytest.MonkeyPatch, failing_for_s: float
) -> None:
    """A lost device fails every step, while a fresh batch touches no device: after
    FAILED_ROUNDS_FOR_GOOD failed rounds in a row over FAILING_FOR_GOOD_S, each with its
    own request answered with the error, the version stops serving (engine_failed) instead
    of failing calls forever while health reads SERVING; the translator, whose steps work,
    goes on. The same failures within a shorter time (one caller resubmitting a request an
    engine bug fails) leave the version serving."""
    from service import scheduler
    from service.scheduler import FAILED_ROUNDS_FOR_GOOD

    monkeypatch.setattr(scheduler, "FAILING_FOR_GOOD_S", failing_for_s)

    def lost_device(batch: Batch) -> None:
        if batch.engine.task is Task.GENERATION:
            raise RuntimeError("device lost")

    async def main(s: Scheduler) -> None:
        for _ in range(FAILED_ROUNDS_FOR_GOOD):
            with pytest.raises(RuntimeError, match="device lost"):
                await s.submit(generate(PROMPTS[0], max_new_tokens=5))
        if failing_for_s:
            with pytest.raises(RuntimeError, match="device lost"):  # still its own error
                await s.submit(generate(PROMPTS[1], max_new_tokens=5))
            assert s.broken() == [] and Task.GENERATION in s.tasks()
        else:
            with pytest.raises(Unavailable, match="stopped: its engine failed") as refused:
                await s.submit(generate(PROMPTS[1], max_new_tokens=5))
            assert refused.value.reason == "engine_failed"
            assert s.broken() == [f"{LM}:1"] and Task.GENERATION not in s.tasks()
        assert (await s.submit(translate(SOURCES[0], max_new_tokens=5))).hypotheses
        await asyncio.wait_for(s.stop(0.0), 5.0)

    run(main, make_scheduler(factory=hooked_engine_factory(lost_device)))


async def _running_and_queued_fail(s: Scheduler, match: str) -> None:
    """One generation running, one queued behind it: both end Unavailable (`match`)."""
    running = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=50)))
    await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
    queued = asyncio.create_task(s.submit(generate(PROMPTS[1], max_new_tokens=50)))
    for task in (running, queued):
        with pytest.raises(Unavailable, match=match):
            await asyncio.wait_for(task, 5.0)


def _lm_engine_that_dies(dies_at: int = 2, held: threading.Event | None = None) -> EngineFactory:
    """Engines whose LM's first batch fails at the step after its `dies_at`-th token (once
    `held` is set, if given) and which can make no batch after that, so its worker thread
    ends (the translator's are plain)."""

    class DyingEngine(Engine):
        batches = 0

        def new_batch(self, compact: bool = True) -> Batch:
            DyingEngine.batches += 1
            if DyingEngine.batches > 1:
                raise MemoryError("no memory for a batch")
            engine = self

            class FailingBatch(Batch):
                def step(self) -> Any:
                    time.sleep(STEP_DELAY)
                    if self.generated(next(iter(self.seqs))) == dies_at:
                        if held is not None:
                            held.wait(10.0)
                        raise RuntimeError("device lost")
                    return super().step()

            return FailingBatch(engine, compact)

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        cls = DyingEngine if entry.name == LM else Engine
        return cls(entry.path, entry.manifest, options)

    return factory


def test_an_engine_that_cannot_start_a_batch_stops_its_version_and_fails_its_requests() -> None:
    """The worker thread ends (a fresh batch cannot be made after a failed step): nothing
    is left waiting for it. Its requests fail with Unavailable, new ones are refused, the
    version reads not ready, and stop() returns."""

    factory = _lm_engine_that_dies()

    async def main(s: Scheduler) -> None:
        await _running_and_queued_fail(s, "en-lm:1 stopped: its engine failed")
        # A call after the death is told so too (not that the model is loading).
        with pytest.raises(Unavailable, match="en-lm:1 stopped: its engine failed") as later:
            await s.submit(generate(PROMPTS[2], max_new_tokens=5))
        assert later.value.reason == "engine_failed"
        assert sample_value(s.metrics, "inference_model_ready", {"model": LM, "version": "1"}) == 0
        assert Task.GENERATION not in s.tasks() and Task.TRANSLATION in s.tasks()
        await asyncio.wait_for(s.stop(0.0), 5.0)

    run(main, make_scheduler(factory=factory))


def test_a_failure_in_the_step_after_a_removal_ends_every_request_it_touched() -> None:
    """The removal and the failing step run in one worker round: the removed request ends
    too (its answer was in the lost round), so nothing is left holding rows and stop()
    returns."""
    armed = [False]

    def fail_when_one_row_is_left(batch: Batch) -> None:
        time.sleep(STEP_DELAY)
        if armed[0] and len(batch.seqs) == 1:
            armed[0] = False
            raise RuntimeError("device lost")

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        kept = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=100)))
        cancelled = asyncio.create_task(s.submit(generate(PROMPTS[1], max_new_tokens=100)))
        await wait_until(lambda: loop_stats(s, key)["running"] == 2)
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 2)
        armed[0] = True
        cancelled.cancel()
        with pytest.raises(RuntimeError, match="device lost"):
            await kept
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        assert loop_stats(s, key)["rows"] == 0
        await asyncio.wait_for(s.stop(0.0), 5.0)

    run(main, make_scheduler(factory=hooked_engine_factory(fail_when_one_row_is_left)))


def test_a_step_that_fails_after_freeing_a_finished_request_still_answers_it() -> None:
    """The step raises while it hands out its finished requests (a token id the tokenizer
    cannot decode): one it freed before the failure is no longer in the batch, yet its
    answer was in the lost round, so it fails too instead of waiting forever (and holding
    its rows, so that stop() never returned)."""

    class FailingBatch(Batch):
        def _result(self, seq: Any, hyps: Any) -> SequenceResult:
            if seq.request.request_id == "second":
                raise IndexError("piece id is out of range")
            return super()._result(seq, hyps)

    class FailingEngine(Engine):
        def new_batch(self, compact: bool = True) -> Batch:
            return FailingBatch(self, compact)

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        return FailingEngine(entry.path, entry.manifest, options)

    requests = [  # the same length: both finish in the failing step
        replace(generate(LONG_PROMPT, max_new_tokens=3), request_id=name)
        for name in ("first", "second")
    ]

    async def main(s: Scheduler) -> list[BaseException | SequenceResult]:
        both = asyncio.gather(*(s.submit(r) for r in requests), return_exceptions=True)
        outcomes = await asyncio.wait_for(both, 5.0)
        assert loop_stats(s, f"{LM}:1")["rows"] == 0
        return outcomes

    outcomes = run(main, make_scheduler(factory=factory))
    assert [str(o) for o in outcomes] == ["piece id is out of range"] * 2


def test_every_request_a_failing_engine_ends_has_one_queue_time() -> None:
    """A failed round took its newcomers in (their wait ends there, as in a round that
    works), and a worker that dies leaves the requests it never took unserved: each
    request queued has its one queue-time observation (none had one)."""
    failures = [RuntimeError("device lost")]

    def fail_the_first_step(batch: Batch) -> None:
        if failures:
            raise failures.pop()

    def queue_times(s: Scheduler) -> float:
        return sample_value(s.metrics, "inference_queue_duration_seconds_count", {"model": LM})

    async def failed_round(s: Scheduler) -> None:
        both = [s.submit(generate(p, max_new_tokens=5)) for p in PROMPTS[:2]]
        outcomes = await asyncio.gather(*both, return_exceptions=True)
        assert [str(o) for o in outcomes] == ["device lost"] * 2
        assert queue_times(s) == 2

    async def died(s: Scheduler) -> None:
        await _running_and_queued_fail(s, "stopped: its engine failed")
        assert queue_times(s) == 2

    run(failed_round, make_scheduler(factory=hooked_engine_factory(fail_the_first_step)))
    run(died, make_scheduler(factory=_lm_engine_that_dies(), max_batch_size=1))


def test_a_request_that_overflows_the_token_budget_waits_for_the_running_one() -> None:
    """Rows are free (1 of 8 used) but two requests of ~100 tokens each do not fit
    max_batch_tokens 150 together: the second waits until the first leaves."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        first = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] == 1)
        second = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] + loop_stats(s, key)["waiting"] == 2)
        steps = loop_stats(s, key)["steps"]
        await wait_until(lambda: loop_stats(s, key)["steps"] >= steps + 5)
        stats = loop_stats(s, key)
        assert (stats["running"], stats["waiting"], stats["rows"]) == (1, 1, 1)
        assert not first.done()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 0)
        assert loop_stats(s, key)["running"] == 1  # the second took the freed budget
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_tokens=150))


def test_static_mode_admits_nothing_while_a_batch_runs() -> None:
    """A request arriving after a static batch started waits (rows free) while the batch
    runs, and starts only once the batch has ended."""
    first = generate(LONG_PROMPT, max_new_tokens=40)
    late = generate(PROMPTS[0], max_new_tokens=5)

    async def main(s: Scheduler) -> tuple[float, float, SequenceResult]:
        key = f"{LM}:1"
        done: dict[str, float] = {}

        async def timed(name: str, r: SequenceRequest) -> SequenceResult:
            result = await s.submit(r)
            done[name] = time.monotonic()
            return result

        batch = asyncio.create_task(timed("first", first))
        await wait_until(lambda: loop_stats(s, key)["running"] == 1)
        later = asyncio.create_task(timed("late", late))
        await wait_until(lambda: loop_stats(s, key)["running"] + loop_stats(s, key)["waiting"] == 2)
        steps = loop_stats(s, key)["steps"]
        await wait_until(lambda: loop_stats(s, key)["steps"] >= steps + 5)
        stats = loop_stats(s, key)
        assert (stats["running"], stats["waiting"]) == (1, 1)
        assert not batch.done()
        result = await batch
        assert len(result.hypotheses[0].token_ids) == 40  # the batch ran to its end
        await later
        return done["first"], done["late"], result

    first_done, late_done, _ = run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), mode="static")
    )
    assert late_done > first_done


def test_a_beam_wider_than_the_batch_is_refused_naming_both() -> None:
    """beam_size > max_batch_size could never be admitted (it would block the queue behind
    it for ever): refused at once, also with an engine whose own row limit is larger."""

    def roomy(entry: ModelVersion, options: EngineOptions) -> Engine:
        return Engine(entry.path, entry.manifest, replace(options, max_batch_size=8))

    async def main(s: Scheduler) -> None:
        request = translate(SOURCES[2], max_new_tokens=5, beam_size=3)
        refusal = r"^options\.beam_size: 3 exceeds max_batch_size 2$"
        with pytest.raises(InvalidArgument, match=refusal):
            await asyncio.wait_for(s.submit(request), 5.0)
        assert loop_stats(s, f"{TRANSLATOR}:1")["waiting"] == 0

    run(main, make_scheduler(factory=roomy, max_batch_size=2))


def test_a_request_refused_at_admission_releases_its_model_version() -> None:
    """A refusal from the queue (deadline already passed, queue full) leaves no hold on
    the version: a retired version would otherwise never drain."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        entry = s.repository.get(LM)
        assert entry.in_flight == 0
        past = generate(PROMPTS[0], within=-1.0, max_new_tokens=5)
        with pytest.raises(DeadlineExceeded, match="before admission") as refused:
            await s.submit(past)
        assert refused.value.facts == {"admitted": "false", "model": LM, "version": "1"}
        assert entry.in_flight == 0
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] == 1)
        queued = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 1)
        assert entry.in_flight == 2
        with pytest.raises(QueueFull):
            await s.submit(long_request())
        assert entry.in_flight == 2
        for task in (running, queued):
            task.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, key)["running"] + loop_stats(s, key)["waiting"] == 0)
        assert entry.in_flight == 0

    run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_size=1, max_queue=1)
    )


def test_a_stream_closed_early_leaves_within_a_step_or_two() -> None:
    """Closing a stream after its first event aborts its request: its row is freed a few
    steps later, and only the tokens it had generated are counted."""

    async def main(s: Scheduler) -> tuple[int, float]:
        key = f"{LM}:1"
        before = sample_value(s.metrics, "inference_output_tokens_total", {"model": LM})
        stream = s.stream(long_request())
        first = await anext(stream)
        assert isinstance(first, TokenEvent)
        closed_at = loop_stats(s, key)["steps"]
        await stream.aclose()
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        assert loop_stats(s, key)["rows"] == 0
        extra = int(loop_stats(s, key)["steps"] - closed_at)
        after = sample_value(s.metrics, "inference_output_tokens_total", {"model": LM})
        return extra, after - before

    extra, counted = run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))
    assert extra <= 5  # not the 100 steps of its max_new_tokens
    assert 0 < counted <= 20


def test_a_job_expired_by_the_loop_fails_with_deadline_exceeded() -> None:
    """The loop's own abort at the deadline (no caller-side timer racing it: the job's
    future is awaited directly) ends the job with DeadlineExceeded, not Cancelled."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        request = generate(LONG_PROMPT, within=0.3, max_new_tokens=100)
        job, _ = s._prepare(request, stream=False)
        expired = r"deadline passed after .*\(\d+ tokens generated\)"
        with pytest.raises(DeadlineExceeded, match=expired) as refused:
            await asyncio.wait_for(job.future, 10.0)
        assert refused.value.facts["admitted"] == "true"
        assert int(refused.value.facts["generated_tokens"]) == job.generated > 0
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)

    # Expected to end in 5 steps: admitted, it then runs past its deadline.
    factory = slow_engine_factory(STEP_DELAY)
    run(main, make_scheduler(factory=factory, initial_length_ratio=0.05))


def test_free_cache_slots_and_running_rows_count_rows_not_requests() -> None:
    """inference_free_cache_slots: max_batch_size less the rows in use (a beam of 2 takes
    2), max_batch_size again once idle; inference_running_rows: those rows."""
    labels = {"model": LM, "version": "1"}

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"

        def gauge(name: str) -> float | None:
            return s.metrics.registry.get_sample_value(name, labels)

        def free() -> float | None:
            return gauge("inference_free_cache_slots")

        await wait_until(lambda: free() == 8)
        task = asyncio.create_task(s.submit(generate(LONG_PROMPT, max_new_tokens=100, beam_size=2)))
        await wait_until(lambda: loop_stats(s, key)["rows"] == 2)
        steps = loop_stats(s, key)["steps"]
        await wait_until(lambda: loop_stats(s, key)["steps"] >= steps + 2)
        assert loop_stats(s, key)["rows"] == 2 and not task.done()
        assert free() == 6
        assert gauge("inference_running_rows") == 2
        assert gauge("inference_running_sequences") == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, key)["running"] == 0)
        await wait_until(lambda: free() == 8, timeout=2.0)
        assert gauge("inference_running_rows") == 0

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))


@pytest.mark.parametrize(
    ("mode", "rows", "free"),
    [("continuous", 1, 7), ("static", 1, 0), ("static-hold", 1, 0), ("static-padded", 2, 0)],
)
def test_the_running_gauges_count_the_rows_the_steps_compute(
    mode: str, rows: int, free: int
) -> None:
    """One of two requests has its answer: static-hold holds it, but its row left the
    batch; static-padded still computes it as padding. A static batch takes no one in
    until it ends, whatever rows it has left."""
    labels = {"model": LM, "version": "1"}
    key = f"{LM}:1"

    def gauge(s: Scheduler, name: str) -> float | None:
        return s.metrics.registry.get_sample_value(name, labels)

    async def main(s: Scheduler) -> dict[str, float | None]:
        short = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=1)))
        long = asyncio.create_task(s.submit(generate(PROMPTS[1], max_new_tokens=60)))
        answered = short.done if mode in ("continuous", "static") else None
        await wait_until(
            lambda: answered() if answered else loop_stats(s, key)["held"] == 1, timeout=5.0
        )
        steps = loop_stats(s, key)["steps"]
        await wait_until(lambda: loop_stats(s, key)["steps"] >= steps + 1)
        assert not long.done()
        seen = {
            name: gauge(s, f"inference_{name}")
            for name in ("running_rows", "running_sequences", "free_cache_slots")
        }
        await asyncio.gather(short, long)
        await wait_until(lambda: gauge(s, "inference_free_cache_slots") == 8, timeout=2.0)
        assert gauge(s, "inference_running_rows") == gauge(s, "inference_running_sequences") == 0
        return seen

    seen = run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), mode=mode))
    assert seen == {"running_rows": rows, "running_sequences": rows, "free_cache_slots": free}


def test_the_estimated_wait_counts_the_step_in_flight() -> None:
    """Rows and tokens are free, but a step is running: a newcomer joins after it, so the
    estimate is one step time, not 0 (0 when idle)."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        assert loop_stats(s, key)["estimated_wait_s"] == 0
        task = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 2)
        stats = loop_stats(s, key)
        assert stats["rows"] == 1 and stats["waiting"] == 0
        assert stats["estimated_wait_s"] > 0
        assert stats["estimated_wait_s"] == pytest.approx(stats["step_s"])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))


@pytest.mark.parametrize(
    ("mode", "max_batch_tokens"),
    [("continuous", 4096), ("static-hold", 4096), ("continuous", 400), ("static", 400)],
)
def test_the_wait_behind_a_deep_queue_is_estimated_from_two_batches_of_it(
    mode: str, max_batch_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind 2 × max_batch_size queued requests the rest count as a flow: an estimate
    looks at as many requests behind a queue of 150 as behind one of 16 (it grew with
    the queue, and the event loop's work with its square), and stays within a quarter of
    simulating every queued request one by one, whether the rows or (400) the token
    budget bound the batch."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        lengths = [5, 20, 60, 100]
        tasks = [
            asyncio.create_task(s.submit(generate(PROMPTS[i % 3], max_new_tokens=lengths[i % 4])))
            for i in range(150)
        ]
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 2)
        loop = s._loops[key]
        assert len(loop.waiting) > 5 * loop.exact_ahead
        looked: list[object] = []
        expected_steps = loop._expected_steps

        def counted(job: Any) -> int:
            looked.append(job)
            return expected_steps(job)

        monkeypatch.setattr(loop, "_expected_steps", counted)
        flow, _, _ = loop._wait(1, 100)
        assert 0 < len(looked) <= loop.exact_ahead + len(loop.running)
        loop.exact_ahead = len(loop.waiting)  # every queued request simulated
        exact, _, _ = loop._wait(1, 100)
        assert len(looked) > len(loop.waiting)
        assert 0.75 * exact < flow < 1.33 * exact
        flow_rows, _ = loop._flow(loop.waiting.load)
        assert (flow_rows < 8) == (max_batch_tokens == 400)  # which budget binds the flow
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    factory = slow_engine_factory(STEP_DELAY)
    run(
        main,
        make_scheduler(
            factory=factory, mode=mode, max_queue=256, max_batch_tokens=max_batch_tokens
        ),
    )


def test_one_more_queued_request_never_shortens_the_estimated_wait() -> None:
    """A request queued beyond the `exact_ahead` simulated one by one adds to the wait.
    The flow behind them once started with room at once, leaving out the wait for the
    batch they were taken in with (ending all at one step): behind a burst of like
    requests, 2 × max_batch_size + 1 queued read about half the wait of 2 ×
    max_batch_size."""

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        loop = s._loops[key]
        tasks = [asyncio.create_task(s.submit(long_request())) for _ in range(8)]
        await wait_until(lambda: loop_stats(s, key)["running"] == 8)
        tasks += [
            asyncio.create_task(s.submit(long_request())) for _ in range(loop.exact_ahead + 1)
        ]
        await wait_until(lambda: len(loop.waiting) == loop.exact_ahead + 1)
        cost = loop.waiting[0].cost
        deeper, _, _ = loop._wait(1, cost)
        last = loop.waiting[-1]
        loop.waiting.remove(last)
        shallower, _, _ = loop._wait(1, cost)
        loop.waiting.append(last)
        assert deeper >= shallower, (deeper, shallower)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    factory = slow_engine_factory(STEP_DELAY)
    run(main, make_scheduler(factory=factory, max_queue=32))


def test_a_queued_request_past_its_deadline_is_not_taken_in() -> None:
    """A request whose deadline passed in the queue before its caller's timer ran (here it
    has none) leaves unserved when its turn comes: the engine never takes it in."""
    held = HeldSteps()

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        first = asyncio.create_task(s.submit(long_request()))
        try:
            # Admitted while the request ahead is held in its first step, the wait reads a
            # step or two (unheld, a stalled event loop let it pass its expected length
            # first, and the request was refused as unmeetable instead).
            await wait_until(lambda: LM in held.stepping)
            job, _ = s._prepare(generate(PROMPTS[1], within=0.1, max_new_tokens=5), stream=False)
        finally:
            held.release.set()
        with pytest.raises(DeadlineExceeded, match=r"\(0 tokens generated\)"):
            await asyncio.wait_for(job.future, 10.0)
        assert job.generated == 0 and job not in s._loops[key].running
        assert not first.done()  # it left while the request ahead of it ran
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    # Admitted (expected to wait a step or two), it then waits past its deadline.
    factory = hooked_engine_factory(held)
    run(main, make_scheduler(factory=factory, max_batch_size=1, initial_length_ratio=0.05))


def test_the_step_time_estimate_follows_the_observed_steps() -> None:
    """stats()["step_s"] (the EWMA behind every wait estimate) moves to the step time the
    engine reports: from its start (10 ms, or one warm-up step) to near 100 ms after ten
    100 ms steps."""
    delay = 0.1

    async def main(s: Scheduler) -> tuple[float, float]:
        key = f"{LM}:1"
        initial = loop_stats(s, key)["step_s"]
        task = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 10)
        later = loop_stats(s, key)["step_s"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return initial, later

    initial, later = run(main, make_scheduler(factory=slow_engine_factory(delay, timed=True)))
    assert initial < 0.5 * delay
    assert later >= 0.5 * delay


# --- lifecycle ---------------------------------------------------------------------------------


def test_stop_lets_in_flight_requests_finish_then_refuses() -> None:
    requests = [generate(p, max_new_tokens=30) for p in PROMPTS[:3]]
    requests += [translate(t, max_new_tokens=30) for t in SOURCES[:3]]

    async def main(s: Scheduler) -> None:
        tasks = [asyncio.create_task(s.submit(r)) for r in requests]
        await asyncio.sleep(0)
        await s.stop(grace_s=30.0)
        results = await asyncio.gather(*tasks)
        assert all(r.hypotheses for r in results)
        with pytest.raises(Unavailable):
            await s.submit(requests[0])
        # A several-text call is told the server is stopping too, not that it loads.
        with pytest.raises(Unavailable) as refused:
            await s.submit_all(requests[3:5])
        assert refused.value.reason == "draining"
        assert s.tasks() == set()

    run(main, make_scheduler(factory=slow_engine_factory(0.005)))


def test_stop_cancels_what_outlasts_the_grace_period() -> None:
    async def main(s: Scheduler) -> None:
        unary = asyncio.create_task(s.submit(long_request()))
        items: list[TokenEvent | SequenceResult] = []

        async def consume() -> None:
            async for item in s.stream(long_request()):
                items.append(item)

        streaming = asyncio.create_task(consume())
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 2)
        await s.stop(grace_s=0.1)
        with pytest.raises(Unavailable):
            await unary
        await streaming
        last = items[-1]
        assert isinstance(last, SequenceResult)
        assert last.hypotheses[0].finish_reason is FinishReason.CANCELLED
        assert 0 < len(last.hypotheses[0].token_ids) < 100

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))


def test_an_answer_finished_before_a_stop_cut_it_goes_out_whole() -> None:
    """The engine finished the request, but the event loop read that step only after a
    stop past its grace had cut what was running (a busy loop lags the worker): the
    answer is whole and goes out, not UNAVAILABLE 'stopped before the request finished'."""
    finished, resume = threading.Event(), threading.Event()

    def pause(out: StepOutput) -> None:
        if out.finished:  # the answer exists; its step reaches the event loop later
            finished.set()
            resume.wait(RUN_TIMEOUT_S)

    factory = hooked_engine_factory(after_step=pause)
    request = generate(PROMPTS[0], max_new_tokens=3)

    async def main(s: Scheduler) -> SequenceResult:
        loop = s._loops[f"{LM}:1"]
        answer = asyncio.create_task(s.submit(request))
        await asyncio.to_thread(finished.wait, RUN_TIMEOUT_S)
        stopping = asyncio.create_task(s.stop(0.0))
        await wait_until(lambda: any(job.abort == "shutdown" for job in loop.running))
        resume.set()
        result = await answer
        await stopping
        return result

    result = run(main, make_scheduler(factory=factory))
    assert result.hypotheses[0].token_ids == alone(request).hypotheses[0].token_ids


def test_limits_and_unknown_models_are_refused_naming_the_cause() -> None:
    async def main(s: Scheduler) -> None:
        with pytest.raises(InvalidArgument, match=r"text: \d+ tokens exceed max_input_tokens 10"):
            await s.submit(translate(SOURCES[0]))
        with pytest.raises(InvalidArgument, match="max_new_tokens"):
            await s.submit(translate("God", max_new_tokens=100))
        with pytest.raises(InvalidArgument, match="max_batch_tokens"):
            await s.submit(translate("God", max_new_tokens=50, beam_size=8, n_best=1))
        with pytest.raises(ModelNotFound, match="en-es"):
            await s.submit(SequenceRequest(Task.TRANSLATION, "x", DecodingParams(), model="fr-de"))
        with pytest.raises(ModelNotFound, match="no version 7"):
            await s.submit(SequenceRequest(Task.TRANSLATION, "x", DecodingParams(), version=7))
        with pytest.raises(ModelNotFound, match="generation model"):
            await s.submit(SequenceRequest(Task.TRANSLATION, "x", DecodingParams(), model=LM))

    run(main, make_scheduler(max_input_tokens=10, max_new_tokens=64, max_batch_tokens=400))


def test_model_information_for_the_models_service() -> None:
    async def main(s: Scheduler) -> None:
        statuses = {st.name: st for st in s.models()}
        assert set(statuses) == {TRANSLATOR, LM}
        tr = statuses[TRANSLATOR]
        assert (tr.task, tr.version, tr.versions, tr.ready) == (Task.TRANSLATION, 1, (1,), True)
        assert (tr.dtype, tr.provider) == ("fp32", "CPUExecutionProvider")
        assert (tr.source_language, tr.target_language) == ("en", "es")
        assert tr.config["arch"] == "encoder-decoder"
        assert s.describe(LM).task is Task.GENERATION
        with pytest.raises(ModelNotFound):
            s.describe("nope")
        assert s.model_label(Task.TRANSLATION, "") == TRANSLATOR
        assert s.model_label(Task.GENERATION, "whatever") == "unknown"
        assert s.tasks() == {Task.TRANSLATION, Task.GENERATION}

    run(main, make_scheduler())


def test_reload_serves_new_versions_and_drains_retired_ones(tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)

    async def main(s: Scheduler) -> None:
        old = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
        copy_version(root, LM, 1, 2)
        summary = await s.reload()
        assert (summary.loaded, summary.retired) == ([f"{LM}:2"], [])
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=5))).version == 2
        pinned = SequenceRequest(Task.GENERATION, PROMPTS[0], DecodingParams(max_new_tokens=5),
                                 version=1)  # fmt: skip
        assert (await s.submit(pinned)).version == 1
        shutil.rmtree(root / LM / "1")
        summary = await s.reload()
        assert (summary.loaded, summary.retired) == ([], [f"{LM}:1"])
        with pytest.raises(ModelNotFound, match="loaded versions: 2"):
            await s.submit(pinned)
        assert f"{LM}:1" in s.stats()  # draining: its request is still running
        result = await old
        assert (result.version, len(result.hypotheses[0].token_ids)) == (1, 100)
        await wait_until(lambda: f"{LM}:1" not in s.stats())
        assert [st.version for st in s.models() if st.name == LM] == [2]

    run(main, make_scheduler(root, factory=slow_engine_factory(STEP_DELAY)))


def _on_trim(monkeypatch: pytest.MonkeyPatch, seen: Callable[[], T]) -> list[T]:
    """What `seen` reads at each malloc_trim of service.engine.return_freed_memory."""
    import service.engine

    trims: list[T] = []

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(seen())
            return 1

    monkeypatch.setattr(service.engine.ctypes, "CDLL", lambda name: Libc())
    return trims


def test_a_version_that_stops_frees_its_engine_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retired version's engine is closed when its loop ends (its sessions freed then,
    not whenever the garbage collector runs), and every engine at shutdown. Once nothing
    holds the retired engine, the heap's free memory goes back to the system."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    closed: list[str] = []
    engines: dict[str, weakref.ref[Engine]] = {}

    class ClosingEngine(Engine):
        def close(self) -> None:
            closed.append(f"{self.name}:{self.version}")
            super().close()

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        engine = ClosingEngine(entry.path, entry.manifest, options)
        engines[entry.key] = weakref.ref(engine)
        return engine

    # At each trim, the engines still alive.
    trimmed = _on_trim(
        monkeypatch, lambda: sorted(k for k, ref in engines.items() if ref() is not None)
    )

    async def main(s: Scheduler) -> None:
        copy_version(root, LM, 1, 2)
        await s.reload()
        shutil.rmtree(root / LM / "1")
        await s.reload()
        registry = s.metrics.registry
        v1 = {"model": LM, "version": "1"}
        # The loop leaves stats() before its engine closes and its gauges go: wait for both.
        await wait_until(
            lambda: (
                closed == [f"{LM}:1"]
                and registry.get_sample_value("inference_free_cache_slots", v1) is None
            )
        )
        assert f"{LM}:1" not in s.stats()
        # Each version had gauges of its own; the stopped one's are gone.
        assert registry.get_sample_value(
            "inference_free_cache_slots", {"model": LM, "version": "2"}
        )
        for name in (
            "inference_free_cache_slots",
            "inference_running_rows",
            "inference_queue_depth",
            "inference_model_ready",
        ):
            assert registry.get_sample_value(name, v1) is None
        await wait_until(lambda: len(trimmed) == 1)
        assert trimmed == [sorted([f"{LM}:2", f"{TRANSLATOR}:1"])]

    run(main, make_scheduler(root, factory=factory))
    assert sorted(closed) == sorted([f"{LM}:1", f"{LM}:2", f"{TRANSLATOR}:1"])


def test_an_engine_that_fails_to_start_gives_its_memory_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version whose engine fails at start (its warm-up out of memory, closed then) is
    tried again by every reload: each time, once nothing holds that engine, the heap's
    free memory goes back to the system."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    failed: list[weakref.ref[Engine]] = []

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        engine = Engine(entry.path, entry.manifest, options)
        if entry.version == 2:  # as _default_engine does when the warm-up fails
            failed.append(weakref.ref(engine))
            engine.close()
            raise MemoryError("the warm-up ran out of memory")
        return engine

    trimmed = _on_trim(monkeypatch, lambda: sum(ref() is not None for ref in failed))
    # pytest keeps the records it captures, and "cannot start model" holds the engine in
    # its traceback: let it be formatted and dropped, as the server's log handler does.
    monkeypatch.setattr(logging.getLogger("service.scheduler"), "propagate", False)

    async def main(s: Scheduler) -> None:
        copy_version(root, LM, 1, 2)
        for _ in range(4):
            assert list((await s.reload()).failed) == [f"{LM}/2"]

    run(main, make_scheduler(root, factory=factory))
    assert len(failed) == 4 and trimmed == [0, 0, 0, 0]


def test_a_newest_version_whose_engine_fails_at_start_leaves_the_one_before(
    tmp_path: Path,
) -> None:
    """keep_versions=1: version 2's manifest checks out but its engine does not start, so
    version 1 serves from the start (not only after a reload), and the reload says why."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    copy_version(root, LM, 1, 2)

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        if entry.key == f"{LM}:2":
            raise RuntimeError("cannot load the decoder")
        return Engine(entry.path, entry.manifest, options)

    repository = ModelRepository(root, DEFAULT_MODELS, keep_versions=1)
    s = Scheduler(repository, SchedulerConfig(), OPTIONS, Metrics(), factory)

    async def main() -> None:
        summary = await s.start()
        try:
            assert sorted(summary.loaded) == [f"{TRANSLATOR}:1", f"{LM}:1"]
            assert "cannot load the decoder" in summary.failed[f"{LM}/2"]
            assert s.missing() == [] and Task.GENERATION in s.tasks()
            assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 1
        finally:
            await s.stop(0.0)

    asyncio.run(main())


def test_a_version_whose_engine_failed_is_tried_again_by_the_next_reload(
    tmp_path: Path,
) -> None:
    """An engine that did not start for a cause outside its folder (memory, the device) is
    tried again by the next reload, once per reload, while the version before it serves;
    also when a newer version fails in that reload. Before, the folder was skipped ("no
    file in it changed since it failed") until a file in it changed: an operator who freed
    the memory and sent SIGHUP got the same failure until a restart, or a write into a
    published (often read-only) model folder."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    copy_version(root, LM, 1, 2)
    memory = {"free": False}
    tried: list[str] = []

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        tried.append(entry.key)
        if entry.key == f"{LM}:3":
            raise RuntimeError("cannot load the decoder")
        if entry.key == f"{LM}:2" and not memory["free"]:
            raise MemoryError("Unable to allocate 12.0 MiB")
        return Engine(entry.path, entry.manifest, options)

    repository = ModelRepository(root, DEFAULT_MODELS, keep_versions=1)
    s = Scheduler(repository, SchedulerConfig(), OPTIONS, Metrics(), factory)
    labels = {"model": LM, "version": "2"}

    async def main() -> None:
        await s.start()
        try:
            assert tried.count(f"{LM}:2") == 1
            summary = await s.reload()
            assert summary.loaded == [] and summary.retired == []
            assert summary.failed == {f"{LM}/2": "MemoryError: Unable to allocate 12.0 MiB"}
            assert tried.count(f"{LM}:2") == 2  # once in this reload, not once per scan
            assert s.metrics.registry.get_sample_value("inference_model_ready", labels) == 0
            # The memory is free, and a version 3 that does not start is published: the
            # reload's scan after version 3 failed tries version 2, which it had not yet.
            memory["free"] = True
            copy_version(root, LM, 1, 3)
            summary = await s.reload()
            assert (summary.loaded, summary.retired, summary.failed) == (
                [f"{LM}:2"],
                [f"{LM}:1"],
                {f"{LM}/3": "RuntimeError: cannot load the decoder"},
            )
            assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 2
            assert s.metrics.registry.get_sample_value("inference_model_ready", labels) == 1
            assert [tried.count(f"{LM}:{v}") for v in (1, 2, 3)] == [1, 3, 1]
        finally:
            await s.stop(0.0)

    asyncio.run(main())


def test_a_model_whose_engine_failed_at_start_serves_after_a_reload(tmp_path: Path) -> None:
    """A model's only version does not start (memory taken by another process, say): the
    server is not ready (readiness keeps traffic away, and liveness does not restart it).
    Once the memory is free, a reload (SIGHUP) starts it and readiness follows; before, the
    pod stayed unready until a restart."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    memory = {"free": False}

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        if entry.name == LM and not memory["free"]:
            raise MemoryError("Unable to allocate 12.0 MiB")
        return Engine(entry.path, entry.manifest, options)

    async def main(s: Scheduler) -> None:
        assert s.missing() == [LM] and Task.GENERATION not in s.tasks()
        memory["free"] = True
        assert (await s.reload()).loaded == [f"{LM}:1"]
        assert s.missing() == [] and Task.GENERATION in s.tasks()
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 1

    run(main, make_scheduler(root, factory=factory))


def test_model_ready_reads_0_for_a_failed_version_and_leaves_with_a_removed_one(
    tmp_path: Path,
) -> None:
    """What InferenceModelNotReady reads: 0 while a version folder fails to load, no series
    once the folder is gone (a model removed on purpose is not a failed one)."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)

    def ready(name: str, version: str) -> float | None:
        labels = {"model": name, "version": version}
        return s.metrics.registry.get_sample_value("inference_model_ready", labels)

    async def main(s: Scheduler) -> None:
        broken = copy_version(root, LM, 1, 2)
        (broken / "tokenizer.model").unlink()
        assert f"{LM}/2" in (await s.reload()).failed
        assert (ready(LM, "1"), ready(LM, "2")) == (1.0, 0.0)
        shutil.rmtree(broken)
        await s.reload()
        assert (ready(LM, "1"), ready(LM, "2")) == (1.0, None)
        shutil.rmtree(root / LM)
        assert (await s.reload()).retired == [f"{LM}:1"]
        await wait_until(lambda: f"{LM}:1" not in s.stats())
        assert ready(LM, "1") is None and ready(TRANSLATOR, "1") == 1.0

    s = make_scheduler(root)
    run(main, s)


def test_a_reload_while_the_repository_is_gone_retires_nothing_and_says_why(
    tmp_path: Path,
) -> None:
    """The repository moved away for a moment (a volume remounted): the reload retired
    every model and the server served none; now it keeps them and names the repository
    among the failures (not as ".")."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)

    async def main(s: Scheduler) -> None:
        root.rename(tmp_path / "away")
        summary = await s.reload()
        assert (summary.loaded, summary.retired) == ([], [])
        assert "cannot list the model repository" in summary.failed[str(root)]
        assert s.missing() == [] and s.tasks() == {Task.TRANSLATION, Task.GENERATION}
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 1

    run(main, make_scheduler(root))


def test_a_model_not_serving_stays_missing_while_its_folder_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """en-es is broken at start: readiness waits for it, and its model_ready reads 0. A
    reload that cannot list the repository, or en-es's folder, knows nothing new of it:
    it stays missing and its model_ready 0 (readiness turned SERVING, with the series
    gone, and stayed so once the folder was back: a health-check hunt's finding)."""
    import service.repository as repository_module

    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    (root / TRANSLATOR / "1" / "tokenizer.model").unlink()
    labels = {"model": TRANSLATOR, "version": "1"}

    async def main(s: Scheduler) -> None:
        def model_ready() -> float | None:
            return s.metrics.registry.get_sample_value("inference_model_ready", labels)

        assert s.missing() == [TRANSLATOR] and model_ready() == 0
        root.rename(tmp_path / "away")
        assert str(root) in (await s.reload()).failed
        assert s.missing() == [TRANSLATOR] and model_ready() == 0
        (tmp_path / "away").rename(root)
        assert s.missing() == [TRANSLATOR] and model_ready() == 0

        real = repository_module.version_dirs

        def version_dirs(model_dir: Path) -> list[int]:
            if model_dir.name == TRANSLATOR:
                raise PermissionError(13, "Permission denied", str(model_dir))
            return real(model_dir)

        monkeypatch.setattr(repository_module, "version_dirs", version_dirs)
        await s.reload()
        assert s.missing() == [TRANSLATOR] and model_ready() == 0

    run(main, make_scheduler(root))


def test_a_version_fixed_while_its_folder_cannot_be_listed_reads_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """en-es/1 fails at start, is fixed and reloaded, and its folder cannot be listed for
    a moment while it warms up: once it serves, its model_ready reads 1 (its old failure
    was kept at 0 for good; a review's finding)."""
    import service.repository as repository_module

    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    tokenizer = root / TRANSLATOR / "1" / "tokenizer.model"
    tokenizer.rename(tmp_path / "tokenizer.model")
    locked = threading.Event()
    real = repository_module.version_dirs

    def version_dirs(model_dir: Path) -> list[int]:
        if locked.is_set() and model_dir.name == TRANSLATOR:
            raise PermissionError(13, "Permission denied", str(model_dir))
        return real(model_dir)

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        if entry.name == TRANSLATOR:
            locked.set()  # from its warm-up on, until the test unlocks it
        return Engine(entry.path, entry.manifest, options)

    monkeypatch.setattr(repository_module, "version_dirs", version_dirs)
    labels = {"model": TRANSLATOR, "version": "1"}

    async def main(s: Scheduler) -> None:
        ready = lambda: s.metrics.registry.get_sample_value("inference_model_ready", labels)  # noqa: E731
        assert ready() == 0 and s.missing() == [TRANSLATOR]
        (tmp_path / "tokenizer.model").rename(tokenizer)
        assert (await s.reload()).loaded == [f"{TRANSLATOR}:1"]
        assert ready() == 1
        locked.clear()
        await s.reload()
        assert ready() == 1 and s.missing() == []

    run(main, make_scheduler(root, factory=factory))


def test_a_repository_that_cannot_be_listed_at_start_is_waited_for_once_it_can(
    tmp_path: Path,
) -> None:
    """Nothing could be listed at start: the models of the first listing are those
    readiness waits for, as if they had been there at start (a review's finding)."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    (root / LM / "1" / "tokenizer.model").unlink()
    root.rename(tmp_path / "away")

    async def main(s: Scheduler) -> None:
        assert s.tasks() == set()  # "" reads NOT_SERVING: nothing serves
        (tmp_path / "away").rename(root)
        await s.reload()
        assert s.missing() == [LM] and Task.TRANSLATION in s.tasks()

    run(main, make_scheduler(root))


def test_readiness_waits_for_every_model_on_disk_at_start_not_for_one_added_later(
    tmp_path: Path,
) -> None:
    """missing() ("" health): a model whose folder was there at start and does not serve
    keeps the server unready until a reload serves it; a model folder that first appears
    in a reload and fails does not unready a server that serves the rest; a model removed
    from disk is no longer waited for."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    (root / LM / "1" / "tokenizer.model").rename(tmp_path / "lm-tokenizer.model")

    async def main(s: Scheduler) -> None:
        assert s.missing() == [LM]
        (tmp_path / "lm-tokenizer.model").rename(root / LM / "1" / "tokenizer.model")
        assert (await s.reload()).loaded == [f"{LM}:1"]
        assert s.missing() == []
        newcomer = root / "en-xx"
        shutil.copytree(root / LM, newcomer)
        assert "en-xx/1" in (await s.reload()).failed  # its manifest names en-lm
        assert s.missing() == []
        shutil.rmtree(newcomer)
        shutil.rmtree(root / LM)
        await s.reload()
        assert s.missing() == []
        assert Task.GENERATION not in s.tasks()

    run(main, make_scheduler(root))


def test_an_engine_that_dies_unreadies_the_server_and_tells_its_watchers(
    tmp_path: Path,
) -> None:
    """The worker of en-lm ends for good: watch() callbacks run on the event loop,
    missing() names the model and broken() the version, so health turns NOT_SERVING
    without a reload; broken() (liveness) stays until the process restarts."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)

    class BrokenEngine(Engine):
        def new_batch(self, compact: bool = True) -> Batch:
            raise RuntimeError("device lost")

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        cls = BrokenEngine if entry.name == LM else Engine
        return cls(entry.path, entry.manifest, options)

    told: list[bool] = []

    async def main(s: Scheduler) -> None:
        event_loop = asyncio.get_running_loop()
        s.watch(lambda: told.append(asyncio.get_running_loop() is event_loop))
        await wait_until(lambda: bool(told))
        assert told == [True]
        assert s.missing() == [LM]
        assert s.broken() == [f"{LM}:1"]
        await s.reload()  # the folder is fine: a reload does not bring the engine back
        assert s.broken() == [f"{LM}:1"]
        # Nor does retiring the version: what killed its engine may outlive it.
        shutil.rmtree(root / LM / "1")
        assert (await s.reload()).retired == [f"{LM}:1"]
        assert s.broken() == [f"{LM}:1"]

    run(main, make_scheduler(root, factory=factory))


def test_a_retired_version_has_no_model_ready_and_a_broken_copy_of_it_reads_0(
    tmp_path: Path,
) -> None:
    """A draining version takes no new requests: its model_ready series is gone at once. A
    broken folder of the same number put back meanwhile reads 0, also after the old copy
    has drained."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    labels = {"model": LM, "version": "1"}

    async def main(s: Scheduler) -> None:
        old = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
        shutil.move(root / LM / "1", tmp_path / "away")
        assert (await s.reload()).retired == [f"{LM}:1"]
        assert s.metrics.registry.get_sample_value("inference_model_ready", labels) is None
        shutil.copytree(tmp_path / "away", root / LM / "1")
        (root / LM / "1" / "tokenizer.model").unlink()
        assert f"{LM}/1" in (await s.reload()).failed
        assert s.metrics.registry.get_sample_value("inference_model_ready", labels) == 0.0
        assert (await old).version == 1
        await wait_until(lambda: f"{LM}:1" not in s.stats())
        assert s.metrics.registry.get_sample_value("inference_model_ready", labels) == 0.0

    run(main, make_scheduler(root, factory=slow_engine_factory(STEP_DELAY)))


def test_a_retired_version_whose_engine_dies_leaves_no_model_ready(tmp_path: Path) -> None:
    """en-lm/1 is removed and retired with a request still decoding, then its engine dies:
    the request fails Unavailable, and the version, gone from disk, gets no model_ready
    series (it read 0 for good, as a model that does not load; a health-check hunt)."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    go = threading.Event()
    factory = _lm_engine_that_dies(dies_at=1, held=go)

    async def main(s: Scheduler) -> None:
        running = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=50)))
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
        shutil.rmtree(root / LM / "1")
        assert (await s.reload()).retired == [f"{LM}:1"]
        go.set()
        with pytest.raises(Unavailable, match="en-lm:1 stopped: its engine failed"):
            await asyncio.wait_for(running, 5.0)
        await wait_until(lambda: f"{LM}:1" not in s.stats())
        labels = {"model": LM, "version": "1"}
        assert s.metrics.registry.get_sample_value("inference_model_ready", labels) is None

    run(main, make_scheduler(root, factory=factory))


def test_a_version_swapped_in_one_reload_has_no_gap(tmp_path: Path) -> None:
    """en-lm/1 replaced by en-lm/2 in one deploy (old folder gone, new one there): version
    1 takes the requests, and is the one described, until version 2 is loaded and warm."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    load_s = [0.0]

    def slow_load(entry: ModelVersion, options: EngineOptions) -> Engine:
        time.sleep(load_s[0])  # a real load and warm-up take seconds
        return Engine(entry.path, entry.manifest, options)

    async def main(s: Scheduler) -> None:
        load_s[0] = 1.0
        copy_version(root, LM, 1, 2)
        shutil.rmtree(root / LM / "1")
        reload = asyncio.create_task(s.reload())
        await asyncio.sleep(0.3)  # version 2 is loading
        assert not reload.done()
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=5))).version == 1
        # Described as calls see it: the version serving, unless the one loading is named.
        assert (s.describe(LM).version, s.describe(LM).ready) == (1, True)
        assert (s.describe(LM, 2).version, s.describe(LM, 2).ready) == (2, False)
        summary = await reload
        assert (summary.loaded, summary.retired) == ([f"{LM}:2"], [f"{LM}:1"])
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=5))).version == 2
        assert (s.describe(LM).version, s.describe(LM).ready) == (2, True)

    run(main, make_scheduler(root, factory=slow_load))


def test_a_version_replaced_while_its_engine_loads_is_not_served_unchecked(
    tmp_path: Path,
) -> None:
    """en-lm/2 is replaced in one rename (as `export --replace` does) after the reload
    checked its hashes but before its engine read the files: the engine would serve files
    no check saw, under the manifest that was checked. The reload refuses it and version 1
    serves; the next reload checks the files there now and serves them."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    swapped: list[str] = []

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        if entry.key == f"{LM}:2" and not swapped:
            replacement = shutil.copytree(entry.path, tmp_path / "replacement")
            shutil.rmtree(entry.path)
            Path(replacement).rename(entry.path)
            swapped.append(entry.key)
        return Engine(entry.path, entry.manifest, options)

    async def main(s: Scheduler) -> None:
        copy_version(root, LM, 1, 2)
        summary = await s.reload()
        assert swapped and summary.loaded == [] and summary.retired == []
        assert "its files changed while it loaded" in summary.failed[f"{LM}/2"]
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 1
        summary = await s.reload()
        assert (summary.loaded, summary.failed) == ([f"{LM}:2"], {})
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 2

    run(main, make_scheduler(root, factory=factory))


def test_a_new_version_estimates_with_the_output_lengths_its_predecessor_learnt(
    tmp_path: Path,
) -> None:
    """A reload's new version takes over the traffic whose output lengths the running one
    has learnt: its admission starts from them, not from initial_length_ratio. It did
    start from that prior, so after a swap it refused deadlines the old version met, or
    (here, a prior below the real lengths) admitted one to expire in its queue."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)

    async def main(s: Scheduler) -> None:
        for _ in range(8):  # it runs to max_new_tokens: the learnt ratio nears 1
            await s.submit(generate(LONG_PROMPT, max_new_tokens=5))
        learnt = s._loops[f"{LM}:1"].length_ratio
        assert learnt > 0.8
        copy_version(root, LM, 1, 2)
        assert (await s.reload()).loaded == [f"{LM}:2"]
        assert s._loops[f"{LM}:2"].length_ratio == learnt
        running = asyncio.create_task(s.submit(long_request()))  # ~87 steps expected
        await wait_until(lambda: loop_stats(s, f"{LM}:2")["steps"] >= 3)
        with pytest.raises(DeadlineUnmeetable, match="estimated queue wait"):
            await s.submit(generate(PROMPTS[0], within=0.6, max_new_tokens=5))
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    factory = slow_engine_factory(STEP_DELAY, timed=True)
    run(main, make_scheduler(root, factory=factory, max_batch_size=1, initial_length_ratio=0.2))


def test_a_corrupt_manifest_fails_its_folder_and_the_other_new_versions_serve(
    tmp_path: Path,
) -> None:
    """en-lm/2's manifest.json is not UTF-8 (corrupt, half-copied), en-es/2 is fine: the
    reload serves en-es/2 and says why en-lm/2 failed. The scan used to raise: the reload
    failed (the Reload RPC answered INTERNAL), en-es/2 stayed listed but never started, and
    the next reload retired en-es/1 for it: translations were refused ("loading") until a
    restart."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    repository = ModelRepository(root, DEFAULT_MODELS, keep_versions=1)
    s = Scheduler(repository, SchedulerConfig(), OPTIONS, Metrics())

    async def main(s: Scheduler) -> None:
        copy_version(root, TRANSLATOR, 1, 2)
        (copy_version(root, LM, 1, 2) / "manifest.json").write_bytes(b"\xff\xfe{")
        summary = await s.reload()
        assert (summary.loaded, summary.retired) == ([f"{TRANSLATOR}:2"], [f"{TRANSLATOR}:1"])
        assert "invalid manifest" in summary.failed[f"{LM}/2"]
        shutil.rmtree(root / LM / "2")
        assert (await s.reload()).failed == {}
        assert (await s.submit(translate(SOURCES[0], max_new_tokens=3))).version == 2
        assert (await s.submit(generate(PROMPTS[0], max_new_tokens=3))).version == 1

    run(main, s)


def test_a_version_back_on_disk_while_it_drains_is_served_again(tmp_path: Path) -> None:
    """Retired with a request in flight, then found again by the next reload: the new loop
    serves it, and the old one, once drained, closes itself and leaves the new one's
    gauges alone."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    key = f"{LM}:1"

    async def main(s: Scheduler) -> None:
        old = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["running"] == 1)
        shutil.move(root / LM / "1", tmp_path / "away")
        assert (await s.reload()).retired == [key]
        shutil.move(tmp_path / "away", root / LM / "1")
        assert (await s.reload()).loaded == [key]
        assert f"{key} (retiring)" in s.stats()
        assert (await old).version == 1
        await wait_until(lambda: f"{key} (retiring)" not in s.stats())
        answer = await asyncio.wait_for(s.submit(generate(PROMPTS[0], max_new_tokens=5)), 5.0)
        assert answer.version == 1
        labels = {"model": LM, "version": "1"}
        assert sample_value(s.metrics, "inference_model_ready", labels) == 1.0
        assert s.metrics.registry.get_sample_value("inference_free_cache_slots", labels) == 8.0

    run(main, make_scheduler(root, factory=slow_engine_factory(STEP_DELAY)))


def test_a_retired_version_that_drains_during_the_stop_grace_is_closed_once(
    tmp_path: Path,
) -> None:
    """Its loop closes itself once drained (during stop()'s grace): stop() closes the
    others only, so its engine is not closed twice (BoundBackend.close raises then) and its
    model_ready series, removed at retirement, does not come back as 0."""
    root = tmp_path / "models"
    shutil.copytree(model_repository(), root)
    closed: list[str] = []
    slow = slow_engine_factory(STEP_DELAY)

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        engine = slow(entry, options)
        close = engine.close

        def counted() -> None:
            closed.append(entry.key)
            close()

        engine.close = counted  # type: ignore[method-assign]
        return engine

    async def main() -> Scheduler:
        s = make_scheduler(root, factory=factory)
        await s.start()
        old = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=20)))
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
        copy_version(root, LM, 1, 2)
        shutil.rmtree(root / LM / "1")
        assert (await s.reload()).retired == [f"{LM}:1"]
        await bounded("Scheduler.stop", s.stop(30.0))  # old finishes within the grace
        assert (await old).version == 1
        return s

    s = asyncio.run(main())
    assert sorted(closed) == sorted([f"{LM}:1", f"{LM}:2", f"{TRANSLATOR}:1"])
    v1 = {"model": LM, "version": "1"}
    assert s.metrics.registry.get_sample_value("inference_model_ready", v1) is None


def test_stop_during_start_leaves_no_model_running() -> None:
    """SIGTERM while the models still load: the versions that finish loading after stop()
    are closed, not started."""
    built: list[Engine] = []
    closed: list[Engine] = []

    class SlowEngine(Engine):
        def close(self) -> None:
            closed.append(self)
            super().close()

    def slow_load(entry: ModelVersion, options: EngineOptions) -> Engine:
        time.sleep(0.5)
        built.append(SlowEngine(entry.path, entry.manifest, options))
        return built[-1]

    async def main() -> None:
        s = make_scheduler(factory=slow_load)
        start = asyncio.create_task(s.start())
        await asyncio.sleep(0.2)  # the first version is loading
        await s.stop(0.0)
        summary = await start
        assert summary.loaded == [] and s.stats() == {}
        assert len(built) == 1 and closed == built  # the one loading when stop() came
        for name in (TRANSLATOR, LM):
            labels = {"model": name, "version": "1"}
            assert sample_value(s.metrics, "inference_model_ready", labels) == 0.0

    asyncio.run(main())


def test_stop_during_a_warm_up_ends_it_at_the_next_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while a version warms up (about 20 shapes here; on a GPU a warm-up can take
    its whole minute's budget): stop() ends the warm-up at its next shape, not after the
    shapes left, and returns once that engine is closed; no version serves."""
    shape_s = 0.3
    runs = slow_decoder(monkeypatch, shape_s)
    closed: list[str] = []
    close = Engine.close

    def closing(engine: Engine) -> None:
        closed.append(f"{engine.name}:{engine.version}")
        close(engine)

    monkeypatch.setattr(Engine, "close", closing)

    async def main() -> None:
        repository = ModelRepository(model_repository(), DEFAULT_MODELS)
        config = SchedulerConfig(max_batch_size=8, max_batch_tokens=4096, max_queue=16)
        s = Scheduler(repository, config, replace(OPTIONS, warmup=True), Metrics())
        start = asyncio.create_task(s.start())
        await wait_until(lambda: len(runs) >= 2, timeout=30)  # the first version warms up
        shapes, stopping = len(runs), time.monotonic()
        await asyncio.wait_for(s.stop(0.0), 10 * shape_s)
        assert len(closed) == 1, f"stop() returned before the warming engine closed: {closed}"
        summary = await asyncio.wait_for(start, shape_s)
        took = time.monotonic() - stopping
        assert took < 4 * shape_s, took  # at most the shape that was running, and the close
        assert len(runs) <= shapes + 1, (shapes, len(runs))
        assert summary.loaded == [] and s.stats() == {}
        for name in (TRANSLATOR, LM):
            labels = {"model": name, "version": "1"}
            assert sample_value(s.metrics, "inference_model_ready", labels) == 0.0

    asyncio.run(main())


def test_an_engine_whose_warm_up_fails_is_closed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm-up that raises (the device out of memory at the largest shape) leaves no
    engine to the garbage collector: Engine.close says why its sessions and device buffers
    must go under the device lock, and on CUDA with graphs the engine is in a reference
    cycle that only a full collection, on any thread, would free."""
    from service.scheduler import _default_engine

    closed: list[Engine] = []
    close = Engine.close

    def closing(engine: Engine) -> None:
        closed.append(engine)
        close(engine)

    def warmup(engine: Engine, stop: threading.Event | None = None) -> None:
        raise RuntimeError("Failed to allocate memory for requested buffer of size 524288000")

    monkeypatch.setattr(Engine, "close", closing)
    monkeypatch.setattr(Engine, "warmup", warmup)
    repository = ModelRepository(model_repository(), DEFAULT_MODELS)
    repository.load_new()
    entry = repository.get(LM)
    with pytest.raises(RuntimeError, match="Failed to allocate"):
        _default_engine(entry, replace(OPTIONS, warmup=True), threading.Event())
    assert len(closed) == 1


def test_a_stop_before_the_start_loads_nothing() -> None:
    """SIGTERM before the load began (the server still binding its ports): start() then
    loads no version, and does not fail (reload() refuses to run once stopping)."""
    built: list[str] = []

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        built.append(entry.key)
        return Engine(entry.path, entry.manifest, options)

    async def main() -> None:
        s = make_scheduler(factory=factory)
        await s.stop(0.0)
        summary = await s.start()
        assert summary.loaded == [] and built == [] and s.stats() == {}

    asyncio.run(main())


def test_a_cancelled_stop_raises_in_its_caller() -> None:
    """stop() under a timeout that expires raises TimeoutError (its caller's
    cancellation is not swallowed)."""

    async def main(s: Scheduler) -> None:
        job = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(s.stop(0.0), 0.1)
        with contextlib.suppress(Unavailable):
            await job

    run(main, make_scheduler(factory=slow_engine_factory(0.5)))


def test_stop_sets_model_ready_to_0_for_every_version() -> None:
    """After stop(), every stopped version's inference_model_ready reads 0 (close():
    "model_ready reads 0 at shutdown"), and its other gauges are gone."""

    async def main(s: Scheduler) -> Scheduler:
        for name in (TRANSLATOR, LM):
            labels = {"model": name, "version": "1"}
            assert s.metrics.registry.get_sample_value("inference_model_ready", labels) == 1.0
        return s

    s = run(main, make_scheduler())
    for name in (TRANSLATOR, LM):
        labels = {"model": name, "version": "1"}
        assert s.metrics.registry.get_sample_value("inference_model_ready", labels) == 0.0
        assert s.metrics.registry.get_sample_value("inference_free_cache_slots", labels) is None


def test_cuda_graphs_gauge_follows_the_engine_and_leaves_with_it() -> None:
    """inference_cuda_graphs: 1 while a version replays CUDA graphs, 0 once it fell back,
    no series for a version where graphs do not apply, removed when the version stops."""
    state = {"graphs": True}

    class GraphEngine(Engine):
        @property
        def cuda_graphs(self) -> bool | None:
            return state["graphs"] if self.task is Task.TRANSLATION else None

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        return GraphEngine(entry.path, entry.manifest, options)

    es, lm = {"model": TRANSLATOR, "version": "1"}, {"model": LM, "version": "1"}

    async def main(s: Scheduler) -> Scheduler:
        registry = s.metrics.registry
        await wait_until(lambda: registry.get_sample_value("inference_cuda_graphs", es) == 1)
        state["graphs"] = False  # a replay failed its check: the engine fell back
        await s.submit(translate(SOURCES[0], max_new_tokens=4))
        await wait_until(lambda: registry.get_sample_value("inference_cuda_graphs", es) == 0)
        assert registry.get_sample_value("inference_cuda_graphs", lm) is None
        return s

    s = run(main, make_scheduler(factory=factory))
    assert s.metrics.registry.get_sample_value("inference_cuda_graphs", es) is None


def test_token_metrics_count_generated_tokens() -> None:
    """Time to first token once per sequence that generated one, an inter-token latency per
    later token (the step that gives EOS generates none), a padding observation per decode
    step, and the tokens of a cancelled sequence in the output counters."""
    requests = [generate(p, max_new_tokens=20) for p in PROMPTS]
    requests += [translate(t, max_new_tokens=20) for t in SOURCES[:3]]

    def count(s: Scheduler, name: str, model: str) -> float:
        return sample_value(s.metrics, f"inference_{name}_count", {"model": model})

    async def main(s: Scheduler) -> None:
        results = await asyncio.gather(*(s.submit(r) for r in requests))
        for model, task in ((LM, Task.GENERATION), (TRANSLATOR, Task.TRANSLATION)):
            lengths = [
                len(res.hypotheses[0].token_ids)
                for req, res in zip(requests, results, strict=True)
                if req.task is task
            ]
            assert count(s, "time_to_first_token_seconds", model) == sum(n > 0 for n in lengths)
            itl = sum(max(0, n - 1) for n in lengths)
            assert count(s, "inter_token_latency_seconds", model) == itl
            out = sample_value(s.metrics, "inference_output_tokens_total", {"model": model})
            assert out == sum(lengths)
            steps = loop_stats(s, f"{model}:1")["steps"]
            assert count(s, "batch_padding_ratio", model) == steps
            assert 1 <= count(s, "admission_padding_ratio", model) <= len(lengths)
        before = sample_value(s.metrics, "inference_output_tokens_total", {"model": LM})
        cancelled = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 1)
        await asyncio.sleep(0.2)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        await wait_until(lambda: loop_stats(s, f"{LM}:1")["running"] == 0)
        after = sample_value(s.metrics, "inference_output_tokens_total", {"model": LM})
        assert after > before

    run(main, make_scheduler(factory=slow_engine_factory(STEP_DELAY)))


def test_a_beam_search_is_timed_by_its_settled_tokens() -> None:
    """A beam's tokens are final only as they settle: a streamed beam search is timed by
    the tokens its stream gets (one first token, then one inter-token latency per token),
    not by its decode steps; a unary one by neither."""

    def count(s: Scheduler, name: str) -> float:
        return sample_value(s.metrics, f"inference_{name}_count", {"model": TRANSLATOR})

    async def main(s: Scheduler) -> None:
        request = translate(SOURCES[1], max_new_tokens=30, beam_size=4)
        answer = await s.submit(request)
        assert count(s, "time_to_first_token_seconds") == 0  # unary: nothing observed
        assert count(s, "inter_token_latency_seconds") == 0
        ids = [
            i
            async for item in s.stream(request)
            if isinstance(item, TokenEvent)
            for i in item.token_ids
        ]
        assert ids == list(answer.hypotheses[0].token_ids) and len(ids) > 2
        assert count(s, "time_to_first_token_seconds") == 1
        assert count(s, "inter_token_latency_seconds") == len(ids) - 1  # not its steps
        loop = s._loops[f"{TRANSLATOR}:1"]
        assert loop.steps > len(ids)  # the beam ran more steps than its answer has tokens

    run(main, make_scheduler())


def test_a_wait_that_ends_unserved_counts_as_queue_time() -> None:
    """A request whose deadline passes in the queue waited too: its wait is observed, not
    left out of the queue-time histogram (a call refused before it waited is not)."""

    async def main(s: Scheduler) -> None:
        key, labels = f"{LM}:1", {"model": LM}
        running = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 2)
        before = sample_value(s.metrics, "inference_queue_duration_seconds_count", labels)
        with pytest.raises(InvalidArgument):  # its first text is withdrawn, not waited
            await s.submit_all([long_request(), generate("word " * 200, max_new_tokens=5)])
        assert loop_stats(s, key)["waiting"] == 0  # withdrawn at once
        expiring = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["waiting"] == 1)
        loop = s._loops[key]
        loop.abort(loop.waiting[0], "deadline")  # as its timer marks a job past its deadline
        with pytest.raises(DeadlineExceeded):
            await expiring
        after = sample_value(s.metrics, "inference_queue_duration_seconds_count", labels)
        assert after == before + 1
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    run(
        main, make_scheduler(factory=slow_engine_factory(STEP_DELAY), max_batch_size=1, max_queue=2)
    )


def test_queue_time_lasts_until_the_engine_takes_the_request_in() -> None:
    """A request that arrives while the engine is inside a long step waits for that step:
    its queue time says so (not the moment it was handed to the engine thread)."""
    slow = [False]
    in_slow_step = threading.Event()

    def step(batch: Batch) -> None:
        if slow[0]:
            in_slow_step.set()
        time.sleep(0.3 if slow[0] else STEP_DELAY)

    async def main(s: Scheduler) -> None:
        key = f"{LM}:1"
        first = asyncio.create_task(s.submit(long_request()))
        await wait_until(lambda: loop_stats(s, key)["steps"] >= 2)
        queued = sample_value(s.metrics, "inference_queue_duration_seconds_sum", {"model": LM})
        slow[0] = True
        # the engine thread is inside a slow step now (an event: a fixed sleep may end
        # before it on a loaded machine)
        await wait_until(in_slow_step.is_set)
        second = asyncio.create_task(s.submit(generate(PROMPTS[0], max_new_tokens=3)))
        await wait_until(lambda: loop_stats(s, key)["running"] == 2)
        slow[0] = False
        await second
        waited = sample_value(s.metrics, "inference_queue_duration_seconds_sum", {"model": LM})
        assert waited - queued >= 0.15
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

    run(main, make_scheduler(factory=hooked_engine_factory(step)))


def test_metrics_follow_the_spec() -> None:
    """Every metric of the spec is declared, with its labels, on a private registry."""
    metrics = Metrics()
    spec = {
        "inference_request_duration_seconds": {"method", "model", "code"},
        "inference_queue_duration_seconds": {"model"},
        "inference_time_to_first_token_seconds": {"model"},
        "inference_inter_token_latency_seconds": {"model"},
        "inference_decode_step_duration_seconds": {"model"},
        "inference_batch_size": {"model"},
        "inference_batch_padding_ratio": {"model"},
        "inference_admission_padding_ratio": {"model"},
        "inference_request_input_tokens": {"model"},
        "inference_request_output_tokens": {"model"},
        "inference_requests_total": {"method", "model", "code"},
        "inference_input_tokens_total": {"model"},
        "inference_output_tokens_total": {"model"},
        "inference_queue_depth": {"model", "version"},
        "inference_running_sequences": {"model", "version"},
        "inference_running_rows": {"model", "version"},
        "inference_free_cache_slots": {"model", "version"},
        "inference_model_ready": {"model", "version"},
        "inference_cuda_graphs": {"model", "version"},
        "inference_estimated_queue_wait_seconds": {"model", "version"},
        "inference_gpu_memory_used_bytes": {"device"},
        "inference_tls_certificate_expiry_timestamp_seconds": set(),
    }
    metrics.observe_request("Translate", "en-es", "OK", 0.01)
    declared = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        declared[name] = family
    assert set(spec) <= set(declared)
    duration = metrics.registry.get_sample_value(
        "inference_request_duration_seconds_bucket",
        {"method": "Translate", "model": "en-es", "code": "OK", "le": "0.0005"},
    )
    assert duration == 0.0  # buckets start at 0.5 ms
    assert Metrics().registry is not metrics.registry

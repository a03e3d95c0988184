"""Iteration-level (continuous) batching: one decoding loop per model version.

Policy (read this before tuning the budgets):

* Budgets, per model version (`SchedulerConfig`), named as vLLM names its own:
  - `max_batch_size`: rows per decoder step; a beam-search request takes beam_size rows.
  - `max_batch_tokens`: tokens the running batch may hold in its caches, each request
    counted at the worst case it can reach: rows × (input tokens + max_new_tokens), so an
    admitted request can never run out of cache. It bounds the requests, not memory: the
    engine's cache holds every row at the longest row's length, its row count rounded up
    to a power of two (memory is bounded by max_batch_size, so rounded up, × max_positions).
  - `max_queue`: sequences waiting for room (not those the free rows and tokens take at
    the loop's next pass); one more is refused with QueueFull at once (the queue is never
    unbounded). A multi-text call's sequences are queued together or not at all
    (`submit_all`).
* Admission happens at step boundaries, first come first served: before every step the
  loop admits waiting requests from the head of the queue while they fit both budgets
  (no overtaking, so a large request is never starved by small ones). Newcomers are
  encoded (translator) or prefilled (generator) together. On the CPU, while rows are
  running, that happens in a helper thread during the batch's step, and they join at the
  step after: a step alone leaves part of a core idle (the engine thread's serial work is
  the limit), which the encoder uses (docs/benchmarks.md measures it). Otherwise (an idle
  batch, a device backend) they are taken in first and join that same step. A sequence
  that finishes leaves at once; its answer is sent from that step and its rows are free
  for the admissions that follow (which join one step later: see the engine-thread
  bullet below).
* mode="static" is the benchmark baseline: a batch is formed only when none is running
  and runs to completion before anything else is admitted. mode="static-hold" also holds
  every answer until its whole batch has ended, as a batched generate call (or
  CTranslate2's translate_batch) returns them: request-level batching as most servers
  without continuous batching do it. mode="static-padded" is static-hold computed as a
  batched generate call (Hugging Face `generate`) computes it, the textbook static
  batching: a finished request's rows stay in every step as padding, at the batch's
  longest lengths, until the whole batch has ended.
* Streams get each step's tokens as that step's output reaches the event loop. A stream
  whose reader fell behind gets all its waiting tokens in one event (`_coalesce`), so a
  busy event loop writes fewer, larger messages instead of falling further behind.
* Deadlines: admission estimates the queue wait (the steps until enough rows and cache
  tokens free up, simulated over the running requests and two batches' worth of the
  queued ones, those behind them as a flow through a full batch, with an EWMA of
  observed output lengths, per source token for a translation and as a share of
  max_new_tokens for a generation, which a reload's new version takes over from the one
  it replaces; a request running past that length counts to its max_new_tokens; each
  step timed at the rows it runs: `StepTimes`), for a unary call plus its own expected
  decode steps (to its batch's end in a HOLDING mode), and refuses with
  DeadlineUnmeetable when that exceeds the time left: a call that would expire with
  nothing to show is told at once instead of taking rows from those that can finish; a
  stream keeps the tokens it got. A call finding the loop idle (nothing running, nothing
  queued but its own texts) takes rows from no one, and is admitted: it corrects stale or
  guessed estimates (DeadlineExceeded when the time left is shorter than the least an
  idle server takes: one step, and a unary call's admission). A request whose deadline
  passes, or whose caller goes away (CancelledError in the awaiting task, or a stream
  closed early), is removed at the next step boundary and its rows freed; the caller
  sees DeadlineExceeded (or its own cancellation) at once.
* stop(grace_s): new requests are refused (Unavailable); queued and running ones may
  finish within grace_s; the rest are then cancelled (streams get their partial result
  with finish reason CANCELLED, unary callers Unavailable), but an answer the engine
  had finished before the cut goes out whole, however late the event loop reads it. A
  version still loading (start, reload) ends its warm-up at the next shape (a
  threading.Event the engine checks between shapes) and is closed without serving, so a
  server stopped while it starts exits in seconds, not after a warm-up that takes up to a
  minute on a GPU. stop_loading() does that alone, when a drain begins: a Reload call in
  flight then ends at once, and the versions serving finish their calls.
* Engine calls run in one worker thread per model version that steps back to back while
  it has rows: it takes the removals and admissions the event loop has posted since its
  last step, steps, and posts the outputs back. Delivering answers, metrics and the next
  admissions happen on the event loop while the next step computes, so the decoder never
  waits for the event loop (which is busy with gRPC), and the translator's and the
  generator's loops step at the same time. A row freed by a step is therefore filled one
  step later, not at the very next step. A step that raises fails the requests of its
  round and the worker goes on with a fresh batch (newcomers whose encoding failed in the
  helper thread fail alone: the batch never saw them); FAILED_ROUNDS_FOR_GOOD failed
  rounds in a row over FAILING_FOR_GOOD_S (or a batch it cannot make) end the worker: the
  version stops serving (engine_failed) and liveness restarts the process.
* Reload loads new versions beside the running ones; a version takes traffic only once
  its engine is warm, the versions it replaces (gone from disk or beyond keep_versions)
  are retired only after that, and a retired one finishes its in-flight requests before
  its loop stops (the repository's refcount and drain hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Hashable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from service.domain import (
    Cancelled,
    DeadlineExceeded,
    DeadlineUnmeetable,
    InvalidArgument,
    ModelNotFound,
    ModelStatus,
    QueueFull,
    ReloadSummary,
    SequenceRequest,
    SequenceResult,
    ServiceError,
    Task,
    TokenEvent,
    Unavailable,
    UnavailableReason,
)
from service.engine import (
    AddOutput,
    BatchItem,
    Engine,
    EngineOptions,
    StepOutput,
    return_freed_memory,
    variant_preference,
)
from service.gpu import CUDA_PROVIDER, GpuMemoryUnavailable, memory_reader
from service.metrics import UNKNOWN_MODEL_LABEL, Metrics
from service.repository import ModelRepository, ModelVersion

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

# Worker rounds failing one after the other, over at least FAILING_FOR_GOOD_S, that end a
# version's worker: each failed round's requests are answered with its error and gone, so
# failures that go on with new requests mean the engine itself is broken (a lost device).
# The time keeps one caller who resubmits a request that fails (an engine bug) from
# ending the version in a fraction of a second.
FAILED_ROUNDS_FOR_GOOD = 5
FAILING_FOR_GOOD_S = 10.0


# Why a reload names a version it found but did not start: a drain began meanwhile.
STOPPED_BEFORE_SERVING = "not started: the server began to stop during this reload"


class EngineFailed(RuntimeError):
    """A version's engine fails every step: its worker ends (see _ModelLoop._drive)."""


class _FailingRounds:
    """The worker's rounds failed in a row (a step, or the encoding of its newcomers)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.since = 0.0  # when the first of them failed
        self.last: BaseException | None = None

    def failed(self, error: BaseException) -> None:
        if not self.rounds:
            self.since = time.monotonic()
        self.rounds += 1
        self.last = error

    def check(self) -> None:
        """EngineFailed once FAILED_ROUNDS_FOR_GOOD have failed over FAILING_FOR_GOOD_S."""
        failing_s = time.monotonic() - self.since
        if self.rounds >= FAILED_ROUNDS_FOR_GOOD and failing_s >= FAILING_FOR_GOOD_S:
            raise EngineFailed(
                f"{self.rounds} rounds in a row failed over {failing_s:.0f} s, the last "
                f"with: {self.last}"
            ) from self.last


Mode = Literal["continuous", "static", "static-hold", "static-padded"]
MODES: tuple[Mode, ...] = ("continuous", "static", "static-hold", "static-padded")
# Modes that hold every answer until the batch ends.
HOLDING: frozenset[Mode] = frozenset({"static-hold", "static-padded"})
StreamItem = TokenEvent | SequenceResult
# The model served when a request names none (the API's defaults).
DEFAULT_MODELS: dict[Task, str] = {Task.TRANSLATION: "en-es", Task.GENERATION: "en-lm"}


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets and modes of every model loop (see the module docstring)."""

    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_queue: int = 256
    mode: Mode = "continuous"
    # Request limits the scheduler enforces itself (each model's own limits apply too).
    max_input_tokens: int = 256
    max_new_tokens: int = 512
    # Weight of the newest observation in the step-time and output-length averages.
    ewma_alpha: float = 0.2
    # Expected output length before any request has finished: a generation's, as a share
    # of its max_new_tokens; a translation's, per input token (outputs follow their
    # sources: the en-es test verses' reference translations have 1.0 token per source
    # token on average, 1.2 at the 90th percentile).
    initial_length_ratio: float = 0.5
    initial_translation_ratio: float = 1.2

    @property
    def compact(self) -> bool:
        """Whether batches drop finished rows (all modes but static-padded)."""
        return self.mode != "static-padded"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue", "max_input_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SchedulerConfig:
        return cls(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue=settings.max_queue,
            mode=settings.batching,
            max_input_tokens=settings.max_input_tokens,
            max_new_tokens=settings.max_new_tokens,
        )


def engine_options_from_settings(settings: Settings) -> EngineOptions:
    return EngineOptions(
        provider=settings.provider,
        cpu_variant=settings.cpu_variant,
        intra_op_threads=settings.intra_op_threads,
        max_batch_size=settings.max_batch_size,
        max_input_tokens=settings.max_input_tokens,
        cuda_graphs=settings.cuda_graphs,
    )


def _coalesce(
    first: TokenEvent, events: asyncio.Queue[StreamItem | BaseException]
) -> tuple[TokenEvent, StreamItem | BaseException | None]:
    """The token events already waiting behind `first`, joined into one, and the item that
    ended the run (a result or an error), if any.

    A stream whose reader fell behind the decoder (the event loop busy with other calls)
    then sends one message for all its waiting tokens instead of one per token: the number
    of messages, the per-call cost of gRPC, follows what the event loop can write instead
    of the step rate. Nothing waits for this: only tokens decoded already are joined."""
    if events.empty():
        return first, None
    ids, text = list(first.token_ids), first.text
    while not events.empty():
        item = events.get_nowait()
        if not isinstance(item, TokenEvent):
            return TokenEvent(ids, text), item
        ids += item.token_ids
        text += item.text
    return TokenEvent(ids, text), None


# The fewest input tokens a round takes in for its time to teach the seconds per token: a
# smaller one's time is mostly the encoder's or prefill's fixed cost (en-es on this
# project's CPU: a 1-token source 0.6 ms a token, 0.09 at 200), which, learnt per token,
# refused a 200-token input on an idle server as DEADLINE_EXCEEDED at 0.1 s, served alone
# in 0.024 s.
ADMIT_TOKENS_TIMED = 64

# Weight of the rounds before the latest in `StepTimes.admission_share`: about the last
# hundred, so a burst's tail (rounds with nobody left to take in) does not erase it.
SHARE_DECAY = 0.99


# A step slower than this many times its knot's estimate counts as this many times it,
# once the knot follows an EWMA. A lone stall (one en-es step of 100-136 ms among steps
# of 8-20 ms, twice in a 20 s overload on this project's CPU) tripled the 32-row
# estimate, and over the next rounds admission refused as unmeetable requests that were
# served in half their deadline; a lasting slowdown still shows within a few steps (each
# may raise the estimate by alpha × (STEP_OUTLIER - 1): a fifth).
STEP_OUTLIER = 2.0


class StepTimes:
    """Wall seconds of the engine's rounds, learnt online: a decoder step by the rows it
    computes; taking a request in (encoder or prefill) per input token; and the share of
    the rounds' time spent taking newcomers in (`admission_share`).

    A step's time grows with its rows (en-es on this project's 2-core CPU: 1.6 ms at 1 row,
    12 ms at 64), so one average over every round, after light load a 1-row step's,
    estimated a burst's wait several times short, and admitted requests that then expired
    in the queue.

    A batch computes a power-of-two count of rows (its capacity: the live rows' bucket, or
    every row of a padded batch), so a step is timed per row bucket (`knots`), started
    from the warm-up's timings. A knot's estimate is the mean of its first steps (the
    first replaces the warm-up's timing, a lone step with none of the serving loop's
    overhead), then an EWMA with weight `alpha`; after the first, a step counts at most
    STEP_OUTLIER times the estimate. Read as the least of its knot and every larger one
    seen, so fewer rows never read slower: a small knot, seen only at bursts' tails, keeps
    a slow step (one that waited for the GIL or another model's step) for long, and read
    as a floor for every larger knot it refused calls a burst then served in a third of
    their deadline. A knot not seen yet reads at least what the smaller ones seen took
    (its warm-up timing has none of the serving loop's overhead)."""

    def __init__(self, prior: dict[int, float], admit_token_s: float, alpha: float) -> None:
        self.alpha = alpha
        self.knots = sorted(prior)
        self.prior = dict(prior)
        self.seconds = dict(prior)
        self.seen = dict.fromkeys(prior, 0)
        self.admit_token_s = self.admit_prior = admit_token_s
        self.admits_seen = 0
        self.step_total = self.admitted_total = 0.0  # decayed sums (`admission_share`)

    def _knot(self, rows: int) -> int:
        """The bucket `rows` rows run in: the smallest knot holding them."""
        return next((k for k in self.knots if k >= rows), self.knots[-1])

    def _gain(self, seen: int) -> float:
        return max(self.alpha, 1 / seen)

    def observe(self, rows: int, seconds: float, admitted: float = 0.0) -> None:
        """A step that computed `rows` rows took `seconds`; its round took in newcomers
        for `admitted` seconds."""
        k = self._knot(rows)
        self.seen[k] += 1
        gain = self._gain(self.seen[k])
        if gain < 1:  # not the first step, nor alpha 1 (follow the last step)
            seconds = min(seconds, STEP_OUTLIER * self.seconds[k])
        self.seconds[k] += gain * (seconds - self.seconds[k])
        self.step_total = SHARE_DECAY * self.step_total + seconds
        self.admitted_total = SHARE_DECAY * self.admitted_total + admitted

    @property
    def admission_share(self) -> float:
        """Seconds spent taking newcomers in per second of steps, over the last hundred
        rounds or so: what a request's decode pays besides its steps, as others join the
        batch between them (at capacity about two a round, 1.5 ms each for en-es on this
        project's CPU: a burst's decodes took 1.3 to 1.5 times their steps; since the CPU
        encodes newcomers during the step, a round pays only the copy into the batch and
        what the encoding outlasts the step)."""
        return self.admitted_total / self.step_total if self.step_total else 0.0

    def observe_admission(self, tokens: int, seconds: float) -> None:
        """A round took in inputs of `tokens` tokens in all in `seconds` (learnt from
        rounds of ADMIT_TOKENS_TIMED tokens or more)."""
        if tokens >= ADMIT_TOKENS_TIMED:
            self.admits_seen += 1
            gain = self._gain(self.admits_seen)
            self.admit_token_s += gain * (seconds / tokens - self.admit_token_s)

    def admission(self, tokens: int, fresh: bool = False) -> float:
        """Seconds to take in inputs of `tokens` tokens in all; `fresh`: on an idle engine,
        no slower than at warm-up (a lower bound, as for a step)."""
        rate = min(self.admit_token_s, self.admit_prior) if fresh else self.admit_token_s
        return rate * tokens

    def __call__(self, rows: int, fresh: bool = False) -> float:
        """A step of `rows` live rows (one at least); `fresh`: of a new batch on an idle
        engine, no slower than at warm-up. The estimates move only as steps run, so an idle
        engine keeps a past batch's times (a slow device, a step that waited on another
        model's), and would refuse every deadline shorter than that, none admitted to lower
        them."""
        knot = self._knot(max(1, rows))
        own = self.seconds[knot]
        if not self.seen[knot]:  # a guess: at least what fewer rows were seen to take
            own = max([own, *(self.seconds[k] for k in self.knots if k < knot and self.seen[k])])
        seconds = min([own, *(self.seconds[k] for k in self.knots if k > knot and self.seen[k])])
        return min(seconds, self.prior[knot]) if fresh else seconds


class _Job:
    """One request from admission to its answer."""

    def __init__(
        self,
        request: SequenceRequest,
        input_ids: list[int],
        entry: ModelVersion,
        stream: bool,
        loop: asyncio.AbstractEventLoop,
        call: object | None = None,
    ) -> None:
        self.request = request
        self.input_ids = input_ids
        self.entry = entry
        self.rows = request.params.beam_size
        self.cost = self.rows * (len(input_ids) + request.params.max_new_tokens)
        # What its output length goes with: a translation's source (one verse's length
        # predicts its translation's, a share of max_new_tokens cannot: a cold server's
        # 0.5 × 128 refused bursts of verses as unmeetable that it then served in time), a
        # generation's max_new_tokens (a prompt says nothing of its continuation).
        self.length_base = (
            len(input_ids) if request.task is Task.TRANSLATION else request.params.max_new_tokens
        )
        self.future: asyncio.Future[SequenceResult] = loop.create_future()
        self.events: asyncio.Queue[StreamItem | BaseException] | None = (
            asyncio.Queue() if stream else None
        )
        # The call it belongs to (a multi-text Translate's texts share one), for admission.
        self.call: object = self if call is None else call
        self.enqueued = time.monotonic()
        self.waited = False  # its queue time is observed (once: `_ModelLoop._left_queue`)
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.generated = 0
        self.state: Literal["waiting", "running", "done"] = "waiting"
        # Why it must leave early (checked at step boundaries).
        self.abort: Literal["cancelled", "deadline", "shutdown"] | None = None
        self.removal_posted = False

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now >= self.request.deadline


@dataclass
class _Load:
    """Sums over queued jobs: what the queue-wait estimate reads of those it does not
    simulate one by one (`_ModelLoop._wait`)."""

    jobs: int = 0
    rows: int = 0
    cost: int = 0  # cache tokens (`_Job.cost`)
    input_tokens: int = 0
    row_base: int = 0  # rows × length base (`_Job.length_base`)
    row_max_new: int = 0  # rows × max_new_tokens

    def add(self, job: _Job, sign: int = 1) -> None:
        self.jobs += sign
        self.rows += sign * job.rows
        self.cost += sign * job.cost
        self.input_tokens += sign * len(job.input_ids)
        self.row_base += sign * job.rows * job.length_base
        self.row_max_new += sign * job.rows * job.request.params.max_new_tokens

    def __sub__(self, other: _Load) -> _Load:
        return _Load(
            self.jobs - other.jobs,
            self.rows - other.rows,
            self.cost - other.cost,
            self.input_tokens - other.input_tokens,
            self.row_base - other.row_base,
            self.row_max_new - other.row_max_new,
        )


class _Waiting:
    """A model loop's queue (first in, first out) with the sums of its jobs kept as they
    come and go: summing a deep queue at every admission and every round made the event
    loop's work grow as the queue's square (3,000 queued: 5 ms an estimate, and half a
    core to hold them besides the engine's own work)."""

    def __init__(self) -> None:
        self._jobs: deque[_Job] = deque()
        self.load = _Load()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[_Job]:
        return iter(self._jobs)

    def __getitem__(self, index: int) -> _Job:
        return self._jobs[index]

    def append(self, job: _Job) -> None:
        self._jobs.append(job)
        self.load.add(job)

    def popleft(self) -> _Job:
        job = self._jobs.popleft()
        self.load.add(job, -1)
        return job

    def remove(self, job: _Job) -> None:
        """Take out one job (the newest at once: a refused call withdraws its own)."""
        if self._jobs and self._jobs[-1] is job:
            self._jobs.pop()
        else:
            self._jobs.remove(job)
        self.load.add(job, -1)

    def remove_if(self, leaves: Callable[[_Job], bool]) -> list[_Job]:
        """Take out every job for which `leaves` is true, in one pass; returns them."""
        kept: deque[_Job] = deque()
        gone: list[_Job] = []
        for job in self._jobs:
            (gone if leaves(job) else kept).append(job)
        if gone:
            self._jobs = kept
            for job in gone:
                self.load.add(job, -1)
        return gone

    def clear(self) -> None:
        self._jobs.clear()
        self.load = _Load()


def _expired(job: _Job) -> DeadlineExceeded:
    """A job's deadline passed after its admission (in the queue or decoding)."""
    seconds = time.monotonic() - job.enqueued
    return DeadlineExceeded(
        f"the deadline passed after {seconds:.3f}s ({job.generated} tokens generated)",
        admitted="true",
        generated_tokens=job.generated,
    )


def _request_ids(keys: Iterable[Hashable]) -> list[str]:
    """The request ids of the jobs among `keys`, sorted, once each: the engine thread has no
    call's request id, so its log lines name every request they concern."""
    return sorted({job.request.request_id for job in keys if isinstance(job, _Job)})


@dataclass
class _Round:
    """What one round of the engine thread did (`_ModelLoop._drive`), with its times."""

    removed: list[tuple[Hashable, SequenceResult]]
    added: AddOutput
    out: StepOutput
    joined: list[Hashable]  # the requests it took in
    taken: float  # time.monotonic() when it began taking them in (their queue time ends)
    ended: float  # ... when its step ended (its tokens exist)
    # Wall seconds since the round before it ended (since `taken` after an idle wait or a
    # failed round): its share of the time, with what the engine's own timing leaves out
    # (the worker's Python between steps, the GIL it shares with the event loop).
    period: float


class _ModelLoop:
    """Queue, running batch and decoding task of one model version."""

    def __init__(
        self, entry: ModelVersion, engine: Engine, config: SchedulerConfig, metrics: Metrics
    ) -> None:
        self.entry = entry
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.label = entry.name
        # The gauges of this version's own state: every loaded version of a model has them.
        self.version_labels = (entry.name, str(entry.version))
        # False once a newer loop of the same name:version (re-added while this one still
        # drains) took over those gauges.
        self.owns_gauges = True
        self.waiting = _Waiting()
        self._sweep = False  # a queued job was aborted: the next pass takes it out
        self.running: dict[_Job, _Job] = {}
        self._held: dict[_Job, SequenceResult] = {}  # HOLDING: answers kept to batch end
        self.rows_used = 0
        self.tokens_used = 0
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.accepting = True
        self.closing = False
        self.retired = False  # a reload retired it: it has no model_ready series
        self.on_failure: Callable[[], None] | None = None  # after the worker died
        # What the event loop posts to the worker thread, which owns the batch (`_drive`).
        self._inbox: list[tuple[list[Hashable], list[BatchItem]]] = []
        self._inbox_ready = threading.Condition()
        self._stop_worker = False
        self._worker: threading.Thread | None = None
        report = engine.warmup_report
        if report is not None and report.step_seconds:
            self.step_times = StepTimes(
                report.step_seconds, report.admit_token_seconds, config.ewma_alpha
            )
        else:  # no warm-up (tests, warmup off): 10 ms a step at any rows until steps run
            prior = dict.fromkeys(engine.row_buckets, 0.01)
            self.step_times = StepTimes(prior, 0.0, config.ewma_alpha)
        # EWMA of finished requests' output lengths over what they follow (`_Job.length_base`).
        self.translation = engine.task is Task.TRANSLATION
        self.length_ratio = (
            config.initial_translation_ratio if self.translation else config.initial_length_ratio
        )
        # EWMA of what one row of a queued request costs the token budget (its cache
        # tokens at worst): the request the wait gauge estimates for.
        self.row_cost = 0.0
        # Queued requests the wait estimate simulates one by one, the rest as a flow
        # (`_wait`): two batches' worth, so the flow begins where the batch is at capacity.
        self.exact_ahead = 2 * config.max_batch_size
        self.steps = 0
        self.task: asyncio.Task[None] | None = None

    # --- admission (event-loop thread) --------------------------------------------------

    def enqueue(self, job: _Job) -> None:
        """Queue a job or refuse it now (QueueFull, DeadlineExceeded, DeadlineUnmeetable)."""
        if not self.accepting:
            raise Unavailable(f"model {self.entry.key} is stopping; retry", reason="draining")
        queued = self.queued()
        if queued >= self.config.max_queue:
            raise QueueFull(
                f"model {self.entry.key}: {queued} sequences already waiting "
                f"(max_queue {self.config.max_queue}); retry later or on another replica",
                **self.entry.facts,
                max_queue=self.config.max_queue,
                queued=queued,
            )
        deadline = job.request.deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"the deadline passed {-left:.3f}s before admission",
                    admitted="false",
                    **self.entry.facts,
                )
            # A unary call that would expire has nothing to show; a stream keeps its tokens.
            unary = job.events is None
            admission = self.step_times.admission(len(job.input_ids)) if unary else 0.0
            # Not even an idle server could answer: one step (and a unary call's admission)
            # is the least it takes. Its expected decode is no such bound, only a guess from
            # other requests' lengths (before any finished, half of a generation's
            # max_new_tokens: a cold server refused as DEADLINE_EXCEEDED generations it
            # answered in a tenth of their deadline, none admitted to learn from).
            least = self.step_times.admission(len(job.input_ids), fresh=True) if unary else 0.0
            alone = self.step_times(job.rows, fresh=True) + least
            if left < alone:
                what = "one decode step and its admission" if unary else "one decode step"
                raise DeadlineExceeded(
                    f"the {left:.3f}s left before the deadline are less than {what} take on "
                    f"an idle server of model {self.entry.key} ({alone:.3f}s)",
                    admitted="false",
                    **self.entry.facts,
                    time_left_seconds=left,
                    least_seconds=alone,
                )
            wait, rows, batch_steps = self._wait(job.rows, job.cost)
            need = f"estimated queue wait {wait:.3f}s"
            if unary:  # its own expected decode: to its batch's end in a HOLDING mode
                steps = max(self._expected_steps(job), batch_steps)
                share = 1 + self.step_times.admission_share
                decode = steps * self.step_times(rows) * share + admission
                need += f" and {decode:.3f}s for its expected {steps} decode steps"
                wait += decode
            # A call finding the loop idle (nothing running, nothing queued but its own
            # texts) takes rows from no one, and is admitted: it is what corrects estimates
            # gone stale or guessed (a cold server's lengths, a step timed slow beside
            # another model's), which refusing every such call kept for good.
            idle = not self.running and (not self.waiting or self.waiting[0].call is job.call)
            if wait > left and not idle:
                raise DeadlineUnmeetable(
                    f"refused at admission: model {self.entry.key}: {need} exceed the "
                    f"{left:.3f}s left before the deadline; retry with a longer deadline or "
                    "on another replica",
                    **self.entry.facts,
                    time_left_seconds=left,
                    estimated_seconds=wait,
                )
        self.waiting.append(job)
        self.idle.clear()
        per_row = job.cost / job.rows
        self.row_cost = per_row if not self.row_cost else 0.9 * self.row_cost + 0.1 * per_row
        self._queue_gauge()
        self.wake.set()

    def queued(self) -> int:
        """Sequences waiting for room, which max_queue bounds: not those at the head of the
        queue that the free rows and tokens take at the loop's next pass. A burst reaching
        a batch with room waits in `waiting` only until the loop runs, and counting it
        refused calls as QueueFull with every row free."""
        return len(self.waiting) - self._admissible()

    def _admissible(self) -> int:
        """How many jobs at the head of the queue the next pass admits (FIFO, within the
        budgets; none in a static mode while its batch runs)."""
        if self.config.mode != "continuous" and self.running:
            return 0
        rows, tokens = self.rows_used, self.tokens_used
        for fitting, job in enumerate(self.waiting):  # at most max_batch_size turns
            rows, tokens = rows + job.rows, tokens + job.cost
            if rows > self.config.max_batch_size or tokens > self.config.max_batch_tokens:
                return fitting
        return len(self.waiting)

    def typical_wait(self) -> float:
        """The queue wait of a typical request arriving now: one row at the recent requests'
        cost, so a token budget held by long requests shows, not only the rows."""
        return self._wait(1, round(self.row_cost))[0]

    @property
    def step_s(self) -> float:
        """The estimated time of the next step, at the running batch's rows."""
        return self.step_times(self.rows_used)

    def _expected_steps(self, job: _Job) -> int:
        expected = math.ceil(self.length_ratio * job.length_base)
        return max(1, min(expected, job.request.params.max_new_tokens))

    def _steps_left(self, job: _Job) -> int:
        """Steps a running job is expected to take still: to the typical length, or, once
        past it, to its max_new_tokens (all that is known of one that ran long: counting
        it as ending at the next step would admit requests to expire behind it)."""
        if job in self._held or job.abort is not None:  # decoded, or leaving at the next step
            return 1
        expected = self._expected_steps(job)
        end = expected if job.generated < expected else job.request.params.max_new_tokens
        return max(1, end - job.generated)

    def _wait(self, rows: int, cost: int) -> tuple[float, int, int]:
        """Seconds a request of `rows` rows and `cost` cache tokens (see max_batch_tokens)
        arriving now would wait to join the batch, the rows the batch then runs (its own
        included), and the steps its answer waits for in a HOLDING mode (the longest
        expected of the batch it joins; 0 otherwise). The steps are simulated with the rows
        each runs, so a wait behind a full batch counts full-batch steps; and the requests
        ahead are taken in (encoded or prefilled) before it. The first `exact_ahead`
        queued requests are simulated one by one, those behind them as a flow through a
        batch at capacity from when the new request would find room behind the simulated
        ones, so an estimate costs the same behind a queue of any depth."""
        max_rows, max_tokens = self.config.max_batch_size, self.config.max_batch_tokens
        running = [(self._steps_left(j), j.rows, j.cost) for j in self.running.values()]
        busy = self.rows_used
        clock = self.step_times.admission(self.waiting.load.input_tokens)
        if self.running:
            clock += self.step_times(busy)  # the step in flight ends first
        head, simulated = list(itertools.islice(self.waiting, self.exact_ahead)), _Load()
        if self.config.mode != "continuous":
            clock += max((steps for steps, _, _ in running), default=0) * self.step_times(busy)
            busy, tokens_now, longest = 0, 0, 0
            closed: list[int] = []  # the expected steps of each batch simulated whole
            for job in head:
                simulated.add(job)
                if busy + job.rows > max_rows or tokens_now + job.cost > max_tokens:
                    clock += longest * self.step_times(busy)
                    closed.append(longest)
                    busy, tokens_now, longest = 0, 0, 0
                busy += job.rows
                tokens_now += job.cost
                longest = max(longest, self._expected_steps(job))
            rest = self.waiting.load - simulated
            if rest.jobs:
                # Behind them: as many batches as the rest's rows and tokens fill (its own
                # the last), each as long as the simulated ones were on average.
                rows_all, tokens_all = busy + rest.rows + rows, tokens_now + rest.cost + cost
                count = max(math.ceil(rows_all / max_rows), math.ceil(tokens_all / max_tokens))
                longest = round(statistics.fmean(closed)) if closed else longest
                per_batch = max(rows, round(rows_all / count))
                clock += (count - 1) * longest * self.step_times(per_batch)
                return clock, per_batch, longest if self.config.mode in HOLDING else 0
            if busy + rows > max_rows or tokens_now + cost > max_tokens:
                clock += longest * self.step_times(busy)
                busy, longest = 0, 0
            return clock, busy + rows, longest if self.config.mode in HOLDING else 0
        t = 0  # steps simulated after the one in flight
        free, free_tokens = max_rows - busy, max_tokens - self.tokens_used
        heapq.heapify(running)
        ahead: list[_Job | None] = [*head, None]  # None: the new request
        for queued in ahead:
            need, need_tokens = (rows, cost) if queued is None else (queued.rows, queued.cost)
            while (free < need or free_tokens < need_tokens) and running:
                done_at, freed, freed_tokens = heapq.heappop(running)
                if done_at > t:
                    clock += (done_at - t) * self.step_times(busy)
                    t = done_at
                free, free_tokens, busy = free + freed, free_tokens + freed_tokens, busy - freed
            if queued is None:
                break
            simulated.add(queued)
            free -= queued.rows
            free_tokens -= queued.cost
            busy += queued.rows
            heapq.heappush(running, (t + self._expected_steps(queued), queued.rows, queued.cost))
        if (rest := self.waiting.load - simulated).jobs:
            # Behind them: the wait for room past the simulated ones (above: a batch taken
            # in together frees its first row only as it ends), then the rest as a flow.
            flow, steps = self._flow(rest)
            return clock + steps * self.step_times(flow), max(rows, flow), 0
        return clock, busy + rows, 0

    def _flow(self, rest: _Load) -> tuple[int, float]:
        """The rows a batch at capacity runs with requests like `rest` (as many as the rows
        and the token budget hold), and the steps it takes to make room for them all: each
        one taken in waits for as much work (rows × steps) to end as it brings."""
        per_row = rest.cost / rest.rows  # cache tokens a row holds
        rows = max(1, min(self.config.max_batch_size, int(self.config.max_batch_tokens / per_row)))
        expected = min(math.ceil(self.length_ratio * rest.row_base), rest.row_max_new)
        return rows, max(rest.rows, expected) / rows

    def _admit(self, now: float) -> list[_Job]:
        """Pop the waiting jobs that join the next step (FIFO, within the budgets; none in
        a static mode while its batch runs). One at the head whose deadline has passed
        (its own timer not run yet) or that was aborted leaves unserved instead."""
        admitted: list[_Job] = []
        if self.config.mode != "continuous" and self.running:
            return admitted
        max_rows, max_tokens = self.config.max_batch_size, self.config.max_batch_tokens
        while self.waiting:
            job = self.waiting[0]
            if job.abort is None and job.expired(now):
                job.abort = "deadline"
            if job.abort is not None:
                self._unserved(self.waiting.popleft(), now)
                continue
            if self.rows_used + job.rows > max_rows or self.tokens_used + job.cost > max_tokens:
                break
            self.waiting.popleft()
            job.state = "running"
            self.running[job] = job
            self.rows_used += job.rows
            self.tokens_used += job.cost
            admitted.append(job)
            self.metrics.request_input_tokens.labels(self.label).observe(len(job.input_ids))
            self.metrics.input_tokens.labels(self.label).inc(len(job.input_ids))
        return admitted

    def _unserved(self, job: _Job, now: float) -> None:
        """A job that left the queue before its turn: it waited, and that wait counts."""
        self._left_queue(job, now)
        self._finish(job, None)

    def abort(self, job: _Job, reason: Literal["cancelled", "deadline", "shutdown"]) -> None:
        """Have a job leave (unless it is leaving already): from the queue at the loop's
        next pass, from the batch at the next step."""
        job.abort = job.abort or reason
        if job.state == "waiting":
            self._sweep = True
        self.wake.set()

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Event-loop side: expire, remove, admit and post to the worker, then sleep until
        a request arrives or leaves, or the worker delivers a step."""
        event_loop = asyncio.get_running_loop()
        self._worker = threading.Thread(
            target=self._drive, args=(event_loop,), name=f"engine-{self.entry.key}", daemon=True
        )
        self._worker.start()
        try:
            while True:
                self.wake.clear()
                now = time.monotonic()
                if self._sweep:  # `abort`: one pass over the queue, not one per arrival
                    self._sweep = False
                    for job in self.waiting.remove_if(lambda job: job.abort is not None):
                        self._unserved(job, now)
                removals: list[Hashable] = []
                for job in self.running.values():
                    if job.abort is None and job.expired(now):
                        job.abort = "deadline"
                    if job.abort is not None and not job.removal_posted:
                        job.removal_posted = True
                        removals.append(job)
                self._release_held()
                admitted = self._admit(now)
                if removals or admitted:
                    items = [
                        BatchItem(job, job.request, job.input_ids, job.events is not None)
                        for job in admitted
                    ]
                    with self._inbox_ready:
                        self._inbox.append((removals, items))
                        self._inbox_ready.notify()
                self._queue_gauge()
                if not self.running:
                    self.idle.set()
                    self._gauges()
                    if self.closing:
                        return
                await self.wake.wait()
        finally:
            with self._inbox_ready:
                self._stop_worker = True
                self._inbox_ready.notify()

    def _drive(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: the only place the batch is touched. Steps while it has rows. A
        failed step fails its requests and the worker goes on with a fresh batch; if the
        engine cannot even make one, or rounds fail in a row for long enough (a lost device
        fails every step, while new_batch touches no device), the worker ends and the
        version stops serving."""
        try:
            self._step_batches(event_loop)
        except Exception as error:
            log.exception(
                "model %s: the engine worker stopped; this process cannot serve it again "
                "(liveness, inference.v1.Models health, now reads NOT_SERVING): restart it",
                self.entry.key,
            )
            with contextlib.suppress(RuntimeError):  # the event loop is closed already
                event_loop.call_soon_threadsafe(self._worker_died, error)

    def _worker_died(self, error: Exception) -> None:
        """Nothing decodes for this version any more: refuse new requests and fail the
        ones it holds with Unavailable (retried elsewhere); model_ready reads 0."""
        self.accepting = False
        failure = Unavailable(
            f"model {self.entry.key} stopped: its engine failed ({error})", reason="engine_failed"
        )
        jobs = [*self.waiting, *self.running.values()]
        now = time.monotonic()
        for job in jobs:  # those the engine never took leave the queue unserved
            self._left_queue(job, now)
        self.waiting.clear()
        self._held.clear()
        for job in jobs:
            self._finish(job, None, failure)
        if self.owns_gauges and not self.retired:
            self.metrics.model_ready.labels(*self.version_labels).set(0)
        self._gauges()
        self.wake.set()
        if self.on_failure is not None:
            self.on_failure()

    def _step_batches(self, event_loop: asyncio.AbstractEventLoop) -> None:
        # On the CPU a helper thread encodes the newcomers while the batch steps
        # (`Batch.step_taking_in`).
        helper = (
            futures.ThreadPoolExecutor(1, thread_name_prefix=f"admit-{self.entry.key}")
            if self.engine.overlaps_admission
            else None
        )
        try:
            self._rounds(event_loop, helper)
        finally:
            if helper is not None:
                helper.shutdown(wait=True)

    def _rounds(
        self, event_loop: asyncio.AbstractEventLoop, helper: futures.ThreadPoolExecutor | None
    ) -> None:
        batch = self.engine.new_batch(compact=self.config.compact)
        failing = _FailingRounds()
        last_ended: float | None = None  # the round before, unless the worker waited since
        while True:
            with self._inbox_ready:
                while not self._inbox and not len(batch) and not self._stop_worker:
                    last_ended = None
                    self._inbox_ready.wait()
                if self._stop_worker and not self._inbox and not len(batch):
                    return
                posted, self._inbox = self._inbox, []
            removals = [key for keys, _ in posted for key in keys]
            items = [item for _, batch_items in posted for item in batch_items]
            in_batch = batch.keys()  # as the round began: a failed step may have freed some
            taken = time.monotonic()  # the newcomers' encode (or prefill) starts now
            joined = [item.key for item in items]
            replies: list[tuple[Callable[..., None], tuple[object, ...]]] = []
            try:
                removed = batch.remove(removals)
                added, out, ended, refused = batch.step_taking_in(items, helper)
                # A request cancelled after its admission was posted may reach this thread
                # in the same round as its admission: its removal above found nothing.
                late = [key for key in removals if key in batch.seqs]
                if late:
                    removed += batch.remove(late)
                finished = time.monotonic()
            except Exception as error:
                # Every request this round touched ends with the error, those removed, or
                # finished and freed, before the failure too: their answers were in the
                # lost round's output, and nothing else would answer them.
                lost = [*removals, *in_batch, *(item.key for item in items)]
                log.exception(
                    "model %s: engine step failed", self.entry.key,
                    extra={"request_ids": _request_ids(lost)},
                )  # fmt: skip
                failing.failed(error)
                last_ended = None
                batch = self.engine.new_batch(compact=self.config.compact)
                replies.append((self._failed, (lost, error, joined, taken)))
            else:
                period = finished - (taken if last_ended is None else last_ended)
                last_ended = finished
                if refused is None:
                    failing.rounds = 0
                else:  # the step went on; the newcomers its encoding failed end with it
                    log.error(
                        "model %s: taking requests in failed", self.entry.key,
                        exc_info=refused, extra={"request_ids": _request_ids(joined)},
                    )  # fmt: skip
                    failing.failed(refused)
                    replies.append((self._failed, (joined, refused, joined, taken)))
                    joined = []
                done = _Round(removed, added, out, joined, taken, ended, period)
                replies.insert(0, (self._dispatch, (done,)))
            try:
                for reply in replies:
                    event_loop.call_soon_threadsafe(reply[0], *reply[1])
            except RuntimeError:  # the event loop is closed: nobody is left to answer
                return
            failing.check()

    def _failed(
        self, keys: list[Hashable], error: BaseException, joined: list[Hashable], taken: float
    ) -> None:
        """A failed round: its requests end with the error. Those it took in waited until
        it began, as those of a round that works do (`_dispatch`)."""
        for key in joined:
            self._left_queue(key, taken)  # type: ignore[arg-type]
        for key in keys:
            self._finish(key, None, error)  # type: ignore[arg-type]
        self._release_held()
        self.wake.set()

    def _dispatch(self, done: _Round) -> None:
        """A worker round's outcome, on the event loop. Its times were taken by the worker
        (when the engine took the newcomers, when the step's tokens existed), not now: the
        event loop may reach this late, or two rounds back to back."""
        m, label = self.metrics, self.label
        removed, added, out = done.removed, done.added, done.out
        joined_tokens = 0
        for key in done.joined:
            job: _Job = key  # type: ignore[assignment]
            self._left_queue(job, done.taken)
            joined_tokens += len(job.input_ids)
        for key, partial in removed:
            self._finish(key, partial)  # type: ignore[arg-type]
        if out.rows:
            self.steps += 1
            # Timed at the rows it computed: a padded batch's finished rows too (its tail
            # of 1-row steps at full-batch times taught a 1-row step several times too
            # slow).
            step = max(0.0, done.period - added.seconds)
            self.step_times.observe(out.capacity, step, added.seconds)
            m.decode_step_duration.labels(label).observe(out.seconds + added.seconds)
            m.batch_size.labels(label).observe(out.rows)
            m.batch_padding_ratio.labels(label).observe(out.padding_ratio)
        if added.rows:
            m.admission_padding_ratio.labels(label).observe(added.padding_ratio)
            self.step_times.observe_admission(joined_tokens, added.seconds)
        now = done.ended
        for key in out.progressed:
            job = key  # type: ignore[assignment]
            job.generated += 1
            if job.rows == 1:  # a beam's tokens are final only as they settle (below)
                self._token_times(job, now, 1)
        for key, event in out.events:
            job = key  # type: ignore[assignment]
            if job.rows > 1 and event.token_ids:
                self._token_times(job, now, len(event.token_ids))
            if job.events is not None and job.state != "done":
                job.events.put_nowait(event)
        for key, result in out.finished:
            job = key  # type: ignore[assignment]
            if job.abort == "shutdown":  # decoded whole before the stop cut it: it goes out
                job.abort = None
            if self.config.mode in HOLDING:
                self._held[job] = result
            else:
                self._finish(job, result)
        self._release_held()
        self._gauges()
        self.wake.set()

    def _left_queue(self, job: _Job, at: float) -> None:
        """Observe a job's queue time once, ended `at`: when the engine took it in, or when
        it left the queue unserved (cancelled, deadline, shutdown, a failed engine). Every
        sequence queued has one, however it ends (a refused call's, withdrawn before it
        waited, has none)."""
        if not job.waited:
            job.waited = True
            self.metrics.queue_duration.labels(self.label).observe(at - job.enqueued)

    def _token_times(self, job: _Job, now: float, tokens: int) -> None:
        """Time to first token and inter-token latency of `tokens` final at `now`."""
        m, label = self.metrics, self.label
        if job.first_token is None:
            job.first_token = now
            m.time_to_first_token.labels(label).observe(now - job.enqueued)
            tokens -= 1
        elif job.last_token is not None:
            m.inter_token_latency.labels(label).observe(now - job.last_token)
            tokens -= 1
        for _ in range(tokens):  # final together with the one before them
            m.inter_token_latency.labels(label).observe(0.0)
        job.last_token = now

    def withdraw(self, job: _Job) -> None:
        """Take a job that never waited out of the queue at once (a refused call's)."""
        self.waiting.remove(job)
        self._finish(job, None)
        self._queue_gauge()

    def _release_held(self) -> None:
        """HOLDING modes: the answers go out together once every running job has one; a held
        job aborted meanwhile ends at once: refused if cancelled or past its deadline,
        answered at a shutdown (its answer is whole)."""
        for job in [j for j in self._held if j.abort is not None]:
            if job.abort == "shutdown":
                job.abort = None
            self._finish(job, self._held.pop(job))
        if self._held and len(self._held) == len(self.running):
            held, self._held = self._held, {}
            for job, result in held.items():
                self._finish(job, result)

    def _queue_gauge(self) -> None:
        if self.owns_gauges:
            self.metrics.queue_depth.labels(*self.version_labels).set(len(self.waiting))

    def _gauges(self) -> None:
        if not self.owns_gauges:
            return
        m, labels = self.metrics, self.version_labels
        m.queue_depth.labels(*labels).set(len(self.waiting))
        # The rows the steps compute: static-hold's held answers left the batch (they stay
        # counted for admission until it ends); static-padded still computes theirs. A
        # cancelled row leaves them at once in every mode (static-padded computes it on).
        held = self._held if self.config.mode == "static-hold" else {}
        m.running_sequences.labels(*labels).set(len(self.running) - len(held))
        m.running_rows.labels(*labels).set(self.rows_used - sum(job.rows for job in held))
        # A static batch takes no one in until it ends.
        free = self.config.max_batch_size - self.rows_used
        if self.config.mode != "continuous" and self.running:
            free = 0
        m.free_cache_slots.labels(*labels).set(free)
        m.estimated_queue_wait.labels(*labels).set(self.typical_wait())
        graphs = self.engine.cuda_graphs
        if graphs is not None:
            m.cuda_graphs.labels(*labels).set(int(graphs))

    def _finish(
        self, job: _Job, result: SequenceResult | None, error: BaseException | None = None
    ) -> None:
        """Deliver the job's outcome once, free its budget and its model reference."""
        if job.state == "done":
            return
        ran = job.state == "running"
        if ran:
            self.running.pop(job, None)
            self.rows_used -= job.rows
            self.tokens_used -= job.cost
        job.state = "done"
        try:
            if job.abort is None and error is None and result is not None:
                self._deliver(job, result)
                self._count_output(result.output_tokens)
                a = self.config.ewma_alpha
                ratio = job.generated / max(1, job.length_base)
                self.length_ratio = (1 - a) * self.length_ratio + a * ratio
            elif job.abort == "shutdown" and job.events is not None and result is not None:
                self._deliver(job, result)  # a stream ends with what it has, CANCELLED
                self._count_output(result.output_tokens)
            else:
                self._fail(job, error or self._abort_error(job))
                if ran:  # cancelled or past its deadline: what it had generated still counts
                    self._count_output(job.generated)
        finally:
            job.entry.release()

    def _count_output(self, tokens: int) -> None:
        self.metrics.request_output_tokens.labels(self.label).observe(tokens)
        self.metrics.output_tokens.labels(self.label).inc(tokens)

    @staticmethod
    def _deliver(job: _Job, result: SequenceResult) -> None:
        if job.events is not None:
            job.events.put_nowait(result)
        elif not job.future.done():
            job.future.set_result(result)

    @staticmethod
    def _fail(job: _Job, error: BaseException) -> None:
        if job.events is not None:
            job.events.put_nowait(error)
        elif not job.future.done():
            job.future.set_exception(error)
            job.future.exception()  # retrieved: no "never retrieved" warning if nobody waits

    def _abort_error(self, job: _Job) -> ServiceError:
        if job.abort == "deadline":
            return _expired(job)
        if job.abort == "shutdown":
            return Unavailable(
                "the server stopped before the request finished; retry", reason="draining"
            )
        return Cancelled("request cancelled by the caller")

    # --- shutdown --------------------------------------------------------------------

    def abort_all(self, reason: Literal["shutdown"]) -> None:
        for job in [*self.waiting, *self.running.values()]:
            self.abort(job, reason)

    async def close(self, retired: bool = False) -> None:
        """Stop the task once nothing is running (call abort_all first to hurry it), and
        remove its gauges. model_ready reads 0 at shutdown; a retired version's was removed
        when it retired (and may read 0 since for a broken folder of the same number)."""
        self.accepting = False
        self.closing = True
        self.wake.set()
        if self.task is not None:
            # wait() leaves the task alone when this caller is cancelled (it raises here).
            await asyncio.wait({self.task})
            if not self.task.cancelled():
                self.task.result()  # the loop's own failure, if it had one
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
        await asyncio.to_thread(self.engine.close)  # may wait for another model's capture
        if not self.owns_gauges:
            return
        m = self.metrics
        if not retired:
            m.model_ready.labels(*self.version_labels).set(0)
        gauges = (m.queue_depth, m.running_sequences, m.running_rows, m.free_cache_slots)
        for gauge in (*gauges, m.estimated_queue_wait, m.cuda_graphs):
            with contextlib.suppress(KeyError):  # cuda_graphs: only GPU versions have it
                gauge.remove(*self.version_labels)


EngineFactory = Callable[[ModelVersion, EngineOptions], Engine]


def _default_engine(entry: ModelVersion, options: EngineOptions, stop: threading.Event) -> Engine:
    """Load and warm a version's engine; `stop` (the scheduler's) ends the warm-up early."""
    engine = Engine(entry.path, entry.manifest, options)
    if options.warmup:
        try:
            engine.warmup(stop)
        except BaseException:
            # Freed now, not by the garbage collector at any time on any thread (perhaps
            # during another model's capture): see Engine.close. On CUDA with graphs the
            # engine is in a reference cycle (its backend's plain_decoder), so without this
            # its sessions and device memory stay until a full collection.
            engine.close()
            raise
    return engine


class Scheduler:
    """Batches requests per model version; the transport's backend.

    repository: where the versions come from (reload() scans it again).
    engine_options: how engines run; its max_batch_size is taken from `config`.
    engine_factory: builds (and warms) an engine for a version (tests inject their own).
    """

    def __init__(
        self,
        repository: ModelRepository,
        config: SchedulerConfig | None = None,
        engine_options: EngineOptions | None = None,
        metrics: Metrics | None = None,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.repository = repository
        self.config = config or SchedulerConfig()
        self.engine_options = replace(
            engine_options or EngineOptions(), max_batch_size=self.config.max_batch_size
        )
        self.metrics = metrics or Metrics()
        # Set by stop() or stop_loading(): a warm-up in progress (in its worker thread) ends
        # at its next shape, and no version starts serving any more.
        self._stop_loading = threading.Event()
        self.engine_factory = engine_factory or functools.partial(
            _default_engine, stop=self._stop_loading
        )
        self._loops: dict[str, _ModelLoop] = {}  # the loop of each live version
        # Loops of retired versions, until their last request has left.
        self._retiring: dict[ModelVersion, _ModelLoop] = {}
        self._stopping = False
        self._reload_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._failed_labels: set[tuple[str, str]] = set()  # (model, version) that failed
        # Models readiness waits for: those on disk at start and those served since (a
        # model folder that first appears in a reload and fails does not unready a server
        # that serves the rest; model_ready 0 says it failed).
        self._required: set[str] = set()
        self._required_unknown = False
        self._watchers: list[Callable[[], None]] = []
        self._died: set[str] = set()  # versions whose engine worker died (broken())
        self._gpus: set[int] = set()  # CUDA devices in use, for the GPU memory metric

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Scheduler:
        """The scheduler a server with these settings runs (default models en-es, en-lm)."""
        options = engine_options_from_settings(settings)
        repository = ModelRepository(
            settings.model_repository,
            DEFAULT_MODELS,
            keep_versions=settings.keep_versions or None,
            variants=variant_preference(options),
        )
        return cls(repository, SchedulerConfig.from_settings(settings), options, metrics)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> ReloadSummary:
        """Load, warm and start every version in the repository (none once stop() or
        stop_loading() came)."""
        on_disk = await asyncio.to_thread(self.repository.names_on_disk)
        self._required = on_disk or set()
        self._required_unknown = on_disk is None  # `missing` takes the first listing
        if self._stop_loading.is_set():  # a SIGTERM before the load began: reload() refuses
            return ReloadSummary([], [], {})
        summary = await self.reload()
        if not self._loops and not self._stop_loading.is_set():
            log.warning("no model could be loaded from %s", self.repository.root)
        return summary

    async def reload(self) -> ReloadSummary:
        """Rescan the repository: start new versions beside the running ones (they take
        traffic once warm), drain and stop the retired ones."""
        if self._stop_loading.is_set():
            raise Unavailable("the scheduler is stopping; reload refused", reason="draining")
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            loaded: list[str] = []
            failed: dict[str, str] = {}
            discarded = True
            start_failed = False  # an engine that failed to start freed its memory
            tried: set[str] = set()  # version folders, as the repository names them
            # A version whose engine does not start took a keep_versions place from the one
            # before it: scan again without it (the repository skips the failed folders
            # this reload has tried, and tries the others).
            while discarded and not self._stop_loading.is_set():
                discarded = False
                result = await asyncio.to_thread(self.repository.load_new, frozenset(tried))
                tried.update(result.failed)
                tried.update(str(entry.path) for entry in result.loaded)
                for path, why in result.failed.items():
                    failed.setdefault(self._folder(path), why)  # the first, real, reason
                handled = 0  # started or discarded
                for entry in result.loaded:
                    if self._stop_loading.is_set():  # a stop or drain came meanwhile
                        break
                    try:
                        await self._start_loop(entry)
                        loaded.append(entry.key)
                        self._required.add(entry.name)
                    except Exception as error:
                        if self._stop_loading.is_set():
                            break
                        log.exception("cannot start model %s", entry.key)
                        why = f"{type(error).__name__}: {error}"
                        self.repository.discard(entry, why)
                        failed[self._folder(entry.path)] = why
                        discarded = start_failed = True
                    handled += 1
                # Named, so that a drain's cut does not read as a reload with nothing new
                # (a deploy script would take the new version for loaded, or for absent).
                for entry in result.loaded[handled:]:
                    failed[self._folder(entry.path)] = STOPPED_BEFORE_SERVING
            if start_failed:  # its folder is tried every reload: give its memory back each time
                await asyncio.to_thread(return_freed_memory)
            # Only now, with the new versions taking traffic, do the ones they replace stop
            # taking it: a deploy that swaps a version's folder has no gap.
            retired = [] if self._stop_loading.is_set() else self.repository.prune()
            for entry in retired:
                self._retire(entry)
            self._mark_failed(failed)
            return ReloadSummary(loaded, [e.key for e in retired], failed)

    def _mark_failed(self, folders: Iterable[str]) -> None:
        """model_ready 0 for each version folder that failed to load (so
        InferenceModelNotReady fires when no version of the model serves), until it loads
        or leaves the disk."""
        labels = set()
        for folder in folders:
            parts = Path(folder).parts
            if len(parts) == 2 and parts[1].isdigit():
                labels.add((parts[0], str(int(parts[1]))))
        # A folder the scan could not list was not tried: its versions' failures stand.
        unlisted = self.repository.unlisted()
        labels |= {
            (name, version)
            for name, version in self._failed_labels
            if (unlisted is None or name in unlisted) and f"{name}:{version}" not in self._loops
        }
        for name, version in self._failed_labels - labels:
            if f"{name}:{version}" not in self._loops:
                with contextlib.suppress(KeyError):
                    self.metrics.model_ready.remove(name, version)
        for name, version in labels:
            self.metrics.model_ready.labels(name, version).set(0)
        self._failed_labels = labels

    def _folder(self, path: str | Path) -> str:
        """A version folder as callers name it: relative to the repository ("en-es/2");
        the repository itself (which could not be listed) by its own path."""
        try:
            relative = Path(path).relative_to(self.repository.root)
        except ValueError:
            return str(path)
        return str(relative) if relative.parts else str(path)

    async def _start_loop(self, entry: ModelVersion) -> None:
        engine = await asyncio.to_thread(self.engine_factory, entry, self.engine_options)
        if await asyncio.to_thread(entry.changed_since_checked):
            # Replaced between its check and the engine's reads: the engine may hold files no
            # check saw, under the manifest that was checked. The next reload checks them.
            await asyncio.to_thread(engine.close)
            raise RuntimeError(
                f"{entry.path}: its files changed while it loaded (replaced after their "
                "check); reload again to check the new ones"
            )
        if self._stop_loading.is_set():  # stop() or a drain came while it loaded
            await asyncio.to_thread(engine.close)
            raise Unavailable(f"the scheduler stopped while {entry.key} loaded", reason="draining")
        if engine.provider == CUDA_PROVIDER and engine.options.device_id not in self._gpus:
            self._gpus.add(engine.options.device_id)
            try:
                self.metrics.gpu_memory_used.read = memory_reader(sorted(self._gpus))
            except GpuMemoryUnavailable as error:
                log.warning("no inference_gpu_memory_used_bytes: %s", error)
        loop = _ModelLoop(entry, engine, self.config, self.metrics)
        # A new version takes over the traffic whose output lengths the running one has
        # learnt: starting from initial_length_ratio, its admission would refuse as
        # unmeetable deadlines that the version it replaces met, until requests finished.
        serving = [
            lp
            for lp in self._loops.values()
            if lp.entry.name == entry.name and lp.translation == loop.translation
        ]
        if serving:
            loop.length_ratio = max(serving, key=lambda lp: lp.entry.version).length_ratio
        loop.on_failure = lambda: self._engine_died(entry.key)
        loop.task = asyncio.get_running_loop().create_task(
            loop.run(), name=f"model-loop-{entry.key}"
        )
        for old in self._retiring.values():
            if old.entry.key == entry.key:  # the same version is back while this one drains
                old.owns_gauges = False
        self._loops[entry.key] = loop
        self.metrics.model_ready.labels(entry.name, str(entry.version)).set(1)

    def _retire(self, entry: ModelVersion) -> None:
        loop = self._loops.get(entry.key)
        if loop is None or loop.entry is not entry:
            return
        del self._loops[entry.key]
        self._retiring[entry] = loop
        loop.accepting = False
        loop.retired = True
        # It takes no new requests: no model_ready series (0 would read as a failed load).
        with contextlib.suppress(KeyError):
            self.metrics.model_ready.remove(*loop.version_labels)
        event_loop = asyncio.get_running_loop()

        def close_soon() -> None:
            task = event_loop.create_task(self._close(entry))
            self._background.add(task)  # a pending task needs a strong reference
            task.add_done_callback(self._background.discard)

        def drained(_: ModelVersion) -> None:
            event_loop.call_soon_threadsafe(close_soon)

        entry.on_drained(drained)

    async def _close(self, entry: ModelVersion) -> None:
        loop = self._retiring.pop(entry, None)
        if loop is not None:
            await loop.close(retired=True)
            log.info("model %s stopped", entry.key)
            del loop  # its engine's memory is free once nothing holds it
            await asyncio.to_thread(return_freed_memory)

    def stop_loading(self) -> None:
        """A drain began: a version loading now ends its warm-up at the next shape and is
        closed unserved, and reloads load nothing more nor retire what serves, so a Reload
        call in flight ends at once instead of holding the drain for a whole warm-up (up
        to a minute on a GPU). The versions serving go on with their calls."""
        self._stop_loading.set()

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests, let in-flight ones finish within grace_s, cancel the rest,
        stop every loop; a version still loading ends its warm-up at the next shape and is
        closed unserved before this returns."""
        self._stopping = True
        self._stop_loading.set()
        loops = [*self._loops.values(), *self._retiring.values()]
        for loop in loops:
            loop.accepting = False
        # A loop whose last request was just answered sets `idle` on its next pass only.
        if not all(loop.idle.is_set() or not (loop.running or loop.waiting) for loop in loops):
            idle = asyncio.gather(*(loop.idle.wait() for loop in loops))
            try:
                await asyncio.wait_for(idle, max(0.0, grace_s))
            except TimeoutError:
                if grace_s > 0:
                    log.warning("stop: grace of %.1fs over; cancelling the rest", grace_s)
                else:  # close(): the transport's own drain grace is over already
                    log.warning("stop: cancelling the requests still running")
        # A retired version that drained during the grace closes itself (`_close`, awaited
        # below): closing it here too would close its engine twice.
        loops = [*self._loops.values(), *self._retiring.values()]
        for loop in loops:
            loop.abort_all("shutdown")
        self._loops.clear()
        self._retiring.clear()
        for loop in loops:
            await loop.close()
        if self._background:  # retired versions' loops closing on their own
            await asyncio.wait(set(self._background))
        if self._reload_lock is not None:
            # A load in progress ends soon (its warm-up is told to stop) and closes its
            # engine itself (`_start_loop`): returning before would leave it open.
            async with self._reload_lock:
                pass

    async def close(self) -> None:
        """Stop at once (the transport drains its calls before)."""
        await self.stop(0.0)

    # --- requests --------------------------------------------------------------------

    def _unusable(self, entry: ModelVersion) -> UnavailableReason | None:
        """Why a version takes no calls now (None: it does): its engine is not warm yet,
        its loop is stopping, or its engine died."""
        if self._stopping:
            return "draining"
        loop = self._loops.get(entry.key)
        if loop is None:
            return "loading"
        if loop.accepting:
            return None
        return "engine_failed" if entry.key in self._died else "draining"

    def _usable(self, entry: ModelVersion) -> bool:
        return self._unusable(entry) is None

    def _prepare(
        self, request: SequenceRequest, stream: bool, call: object | None = None
    ) -> tuple[_Job, _ModelLoop]:
        """Resolve the model, tokenize, check limits and budgets, queue: the refusals
        all happen here, before anything is decoded. `call`: shared by the sequences of
        one call (submit_all)."""
        if self._stopping:
            raise Unavailable(
                "the server is shutting down; retry on another replica", reason="draining"
            )
        entry = self.repository.get(request.model, request.version, request.task, self._unusable)
        loop = self._loops[entry.key]
        engine = loop.engine
        input_ids = engine.encode(request.text)
        request = engine.fit(request, input_ids)
        engine.check(request, input_ids, self.config.max_input_tokens)
        p = request.params
        if p.max_new_tokens > self.config.max_new_tokens:
            raise InvalidArgument(
                "options.max_new_tokens",
                f"{p.max_new_tokens} exceeds the limit {self.config.max_new_tokens}",
            )
        if p.beam_size > self.config.max_batch_size:
            raise InvalidArgument(
                "options.beam_size",
                f"{p.beam_size} exceeds max_batch_size {self.config.max_batch_size}",
            )
        budget = self.config.max_batch_tokens // p.beam_size - len(input_ids)
        if p.max_new_tokens_default and 1 <= budget < p.max_new_tokens:
            # The server's default, lowered to what the token budget can hold (as `fit`
            # lowers it to the model's limits); a value the caller set is refused below.
            request = replace(request, params=replace(p, max_new_tokens=budget))
        job = _Job(request, input_ids, entry, stream, asyncio.get_running_loop(), call)
        if job.cost > self.config.max_batch_tokens:
            raise InvalidArgument(
                "options.max_new_tokens" if not p.max_new_tokens_default else "text",
                f"beam_size {p.beam_size} × (input {len(input_ids)} + max_new_tokens "
                f"{p.max_new_tokens}) = {job.cost} tokens exceed max_batch_tokens "
                f"{self.config.max_batch_tokens}",
            )
        entry.acquire()
        try:
            loop.enqueue(job)
        except BaseException:
            entry.release()
            raise
        return job, loop

    async def submit(self, request: SequenceRequest) -> SequenceResult:
        """Decode one sequence to its end. Cancelling the awaiting task removes it from
        the batch at the next step; past its deadline it raises DeadlineExceeded."""
        job, loop = self._prepare(request, stream=False)
        return await self._answer(job, loop)

    async def submit_all(
        self,
        requests: Sequence[SequenceRequest],
        check: Callable[[int, SequenceResult], None] | None = None,
    ) -> list[SequenceResult]:
        """Decode a call's sequences (a multi-text Translate) together. They are queued in
        one go, with no await between (no other call's sequences slip in), or none is: a
        queue without room for them all gives QueueFull naming the call's need, and the
        first refusal (InvalidArgument with `index` set) withdraws those queued before it.
        The first failure while decoding cancels the others. `check(i, result)` sees each
        result as it comes: what it raises fails the call the same way (the transport
        refuses an answer over the max message size before the rest is decoded)."""
        prepared: list[tuple[_Job, _ModelLoop]] = []
        call = object()
        try:
            self._check_room(requests)
            for i, request in enumerate(requests):
                try:
                    prepared.append(self._prepare(request, stream=False, call=call))
                except InvalidArgument as error:
                    error.index = i
                    raise
        except BaseException:
            for job, loop in prepared:
                job.abort = "cancelled"
                job.future.cancel()  # nobody awaits it
                loop.withdraw(job)
            raise

        async def answer(i: int, job: _Job, loop: _ModelLoop) -> SequenceResult:
            result = await self._answer(job, loop)
            if check is not None:
                check(i, result)
            return result

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(answer(i, job, loop))
                    for i, (job, loop) in enumerate(prepared)
                ]
        except BaseExceptionGroup as failures:
            # The first real error (the others are its cancellations or the same cause).
            for failure in failures.exceptions:
                if isinstance(failure, ServiceError):
                    raise failure from None
            raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _answer(self, job: _Job, loop: _ModelLoop) -> SequenceResult:
        """A queued job's result; its deadline or the caller's cancellation withdraws it."""
        request = job.request
        try:
            if request.deadline is None:
                return await job.future
            timeout = request.deadline - time.monotonic()
            return await asyncio.wait_for(job.future, max(0.0, timeout))
        except TimeoutError:
            loop.abort(job, "deadline")
            raise _expired(job) from None
        except asyncio.CancelledError:
            loop.abort(job, "cancelled")
            raise

    async def stream(self, request: SequenceRequest) -> AsyncGenerator[StreamItem, None]:
        """TokenEvents as text becomes final, then the SequenceResult. Refusals raise at
        the first iteration; closing the iterator early cancels the request."""
        job, loop = self._prepare(request, stream=True)
        assert job.events is not None
        held: StreamItem | BaseException | None = None
        try:
            while True:
                if held is not None:
                    item, held = held, None
                elif request.deadline is None:
                    item = await job.events.get()
                else:
                    timeout = request.deadline - time.monotonic()
                    try:
                        item = await asyncio.wait_for(job.events.get(), max(0.0, timeout))
                    except TimeoutError:
                        loop.abort(job, "deadline")
                        raise _expired(job) from None
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TokenEvent):
                    item, held = _coalesce(item, job.events)
                yield item
                if isinstance(item, SequenceResult):
                    return
        finally:
            if job.state != "done":
                loop.abort(job, "cancelled")

    def _check_room(self, requests: Sequence[SequenceRequest]) -> None:
        """Refuse (QueueFull) a call whose sequences cannot all wait in their model's
        queue, before any is queued."""
        if len(requests) < 2:
            return
        first = requests[0]
        entry = self.repository.get(first.model, first.version, first.task, self._unusable)
        free = self.config.max_queue - self._loops[entry.key].queued()
        if len(requests) > free:
            raise QueueFull(
                f"model {entry.key}: this call's {len(requests)} texts need as many queue "
                f"places and {free} of max_queue {self.config.max_queue} are free; retry "
                "later, on another replica, or in smaller calls",
                **entry.facts,
                max_queue=self.config.max_queue,
                queued=self.config.max_queue - free,
            )

    # --- model information -----------------------------------------------------------

    def _status(self, entry: ModelVersion) -> ModelStatus:
        loop = self._loops.get(entry.key)
        m = entry.manifest
        return ModelStatus(
            name=entry.name,
            version=entry.version,
            task=entry.task,
            source_language=m.source_language,
            target_language=m.target_language,
            dtype=loop.engine.variant if loop else "",
            provider=loop.engine.provider if loop else "",
            max_input_tokens=min(m.limits.max_input_tokens, self.config.max_input_tokens),
            max_new_tokens=min(m.limits.max_new_tokens, self.config.max_new_tokens),
            versions=tuple(self.repository.versions(entry.name)),
            ready=self._usable(entry),
            config=dict(m.config),
            max_positions=m.limits.max_positions,
        )

    def models(self) -> list[ModelStatus]:
        """Every loaded version, by name then version."""
        return [self._status(e) for e in self.repository.all()]

    def describe(self, name: str, version: int | None = None) -> ModelStatus:
        """One model version; raises ModelNotFound. Without a version, the newest one that
        takes calls, as a call naming none gets (a version still loading is described
        when named, or when none serves): during a reload it described the new version,
        not ready and without dtype or provider, while calls went to the one before."""
        if not name:
            raise ModelNotFound(f"name is empty; loaded models: {self.repository.names()}")
        entry = self.repository.get(name, version)
        if not version and not self._usable(entry):
            with contextlib.suppress(Unavailable):
                entry = self.repository.get(name, version, unusable=self._unusable)
        return self._status(entry)

    def model_label(self, task: Task | None, name: str) -> str:
        """Metrics label: the model's name if loaded, the task default for "", else a
        fixed placeholder (never the caller's string: label cardinality)."""
        if name:
            return name if name in self.repository.names() else UNKNOWN_MODEL_LABEL
        if task is None:
            return UNKNOWN_MODEL_LABEL
        return self.repository.default_name(task) or UNKNOWN_MODEL_LABEL

    def tasks(self) -> set[Task]:
        """Tasks with at least one version taking traffic (none once stopping)."""
        return {e.task for e in self.repository.all() if self._usable(e)}

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) when a version stops serving on its own: its
        engine worker died. start() and reload() report their changes by returning."""
        self._watchers.append(callback)

    def _engine_died(self, key: str) -> None:
        self._died.add(key)
        for callback in self._watchers:
            callback()

    def broken(self) -> list[str]:
        """Versions whose engine worker died in this process, retired since or not: what
        killed it (a lost device, memory) may outlive the version, so only a restart
        clears this."""
        return sorted(self._died)

    def missing(self) -> list[str]:
        """Models readiness waits for that have no version taking traffic: still on disk
        (or where that cannot be told: a folder that cannot be listed is not a removed
        one), and there at start or served since."""
        if self._stopping:
            return sorted(self._required)
        serving = {e.name for e in self.repository.all() if self._usable(e)}
        on_disk = self.repository.names_on_disk()
        unlisted = self.repository.unlisted()
        if on_disk is not None and self._required_unknown:  # unlisted at start: as there
            self._required |= on_disk
            self._required_unknown = False
        if on_disk is not None and unlisted is not None:
            required = self._required & (on_disk | unlisted)
        else:
            required = self._required
        return sorted(required - serving)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per version: queue, running (held answers included), held, rows, step time
        estimate, estimated wait, steps run (tests, logs). A retired version still draining
        is listed under its key, or "<key> (retiring)" if that version was loaded again
        meanwhile."""
        loops: dict[str, _ModelLoop] = {}
        for entry, loop in self._retiring.items():
            loops[f"{entry.key} (retiring)" if entry.key in self._loops else entry.key] = loop
        loops.update(self._loops)
        return {
            key: {
                "waiting": len(loop.waiting),
                "running": len(loop.running),
                "held": len(loop._held),
                "rows": loop.rows_used,
                "step_s": loop.step_s,
                "estimated_wait_s": loop.typical_wait(),
                "steps": loop.steps,
            }
            for key, loop in loops.items()
        }


__all__ = [
    "DEFAULT_MODELS",
    "Scheduler",
    "SchedulerConfig",
    "engine_options_from_settings",
]

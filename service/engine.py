"""The inference engine: onnxruntime sessions of one model version and a batch of rows
decoded one step at a time, with the reference decoder's rules (transformer/decoding.py)
re-implemented in numpy so the served outputs equal the PyTorch ones token for token.

Why it is built this way:

* A *row* is one sequence, or one beam of a beam-search request. All rows of a model
  share one self-attention cache `[L, R, H, C, Dh]` (export/README.md) whose row count R
  and capacity C are buckets (powers of two; on the CPU C steps by 16, see `cache_for`),
  so the decoder sees few distinct shapes (warmed up at load) and a cache grows by
  copying, never by recomputing. Free slots are
  simply skipped: removing a row costs nothing; the batch is compacted when it is mostly
  empty. Beam search reorders cache rows after each step (one gather).
* Newcomers join between steps (`add`): translator sources are encoded together (their
  first decoder input is the start token at position 0, like every running row's next
  token); language-model prompts are prefilled together up to their last token, which is
  fed by the next common step. So `step()` is always one decoder call with one new token
  per row, and the decoding rules below see one logits row per sequence or beam. The
  decoder returns only the new keys and values; the batch writes them into its cache.
* How the tensors live is the backend's business (service/backends.py). On CUDA (fp16
  variant) the caches stay on the device as OrtValues: the decoder runs with IOBinding,
  cache writes and row moves run as tiny ONNX graphs on the same device, and greedy rows
  are reduced there (argmax and its log-probability), so the [B, V] logits come to the
  host only when a row samples or searches beams.
  Decoding a small model on a GPU is bound by kernel launches, so each decode-step shape
  (rows, cache length, source length) is captured as a CUDA graph at its first step and
  replayed after: the batch keeps, per shape, fixed device buffers the graph was bound to
  (`Batch.buffers`, service/device.py), writes its caches in place and copies into them
  what a relayout or an admission produced. Each graph's first replay, and its
  RECHECK_REPLAY-th run, are checked against a plain run; any failure turns graphs off
  and decoding goes on without them. Warm-up
  runs every shape plainly (kernel choice, allocations) but captures none: a graph and
  its buffers cost device memory, so only the shapes a batch reaches get them, each for a
  few runs' time at its first step.
  On CPU they are numpy arrays fed to `session.run` and written in place. The device path,
  fixed buffers included, also runs on CPU (`EngineOptions(io_binding=True)`), which is
  how it is tested without a GPU.
* This module is synchronous and knows nothing of asyncio; the scheduler calls it from a
  worker thread (onnxruntime releases the GIL while it computes). A warm-up takes a
  threading.Event from the scheduler's stop() and ends at its next shape once it is set.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from concurrent import futures
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from export.manifest import Manifest
from service.backends import (
    CPU,
    CUDA,
    MIN_GRAPH_ORT,
    Backend,
    BoundBackend,
    NumpyBackend,
    decoder_with_greedy,
    graphs_supported,
    log_prob_of,
    log_softmax,
    providers_for,
    session_options,
    zero_step,
)
from service.device import DEVICE_LOCK
from service.domain import (
    DecodingParams,
    FinishReason,
    HypothesisResult,
    InvalidArgument,
    SequenceRequest,
    SequenceResult,
    Task,
    TokenEvent,
)
from service.tokenizer import REPLACEMENT, TextSoFar, Tokenizer, find_stop, stable_prefix

log = logging.getLogger(__name__)

MIN_CACHE = 16  # smallest cache capacity / source / prefill bucket
# Prompt tokens (rows × width) one CPU prefill run takes at most; more are prefilled a
# group of rows at a time. The decoder returns logits at every position, [rows, width,
# vocab]: 64 prompts of 256 tokens in one run grew en-lm's CPU arena by 1.5 GB at their
# first sight; its warm-up of the largest group at the widest prompt (8 × 256) grows it by
# 0.13 GB, and the 64 prompts take as long in groups.
PREFILL_TOKENS = 2048
_NEG_INF = np.float32(-np.inf)


def return_freed_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's malloc_trim; nothing where
    the C library has none): glibc keeps what a closed engine freed, so a server's resident
    memory grew with reloads (deploy/README.md: from 879 to 1,054-1,087 MiB over 12 reloads
    of en-lm; 835-864 MiB with it). The collector runs first: an engine that failed to
    start is held by its exception's traceback in a reference cycle until it does."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


# --- options and provider choice -----------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model version (from the server settings).

    provider: "auto" picks CUDA (fp16) when onnxruntime has it, else CPU (`cpu_variant`).
    intra_op_threads: CPU threads per session (0 = the cores this process may use, within
      its cgroup's CPU quota).
    max_batch_size: most rows (sequences + beams) in one batch; bounds the row buckets.
    max_input_tokens: the server's limit on an input (0 = the model's own); bounds the
      source buckets, and with them the encoder's largest warm-up (its memory).
    io_binding: None = on for CUDA only; True runs the device path on CPU (tests).
    cuda_graphs: on the device path, step on fixed buffers per shape bucket and, on CUDA,
      replay each step shape as a CUDA graph captured at its first step (checked against
      a plain run at its first replay and again at its RECHECK_REPLAY-th run; any failure
      falls back to plain runs, logged). On CPU with io_binding the fixed buffers are used
      without capture (how it is tested).
    warmup: run every shape bucket once at load, within `warmup_budget_s` seconds.
    """

    provider: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_variant: Literal["int8", "fp32"] = "fp32"
    intra_op_threads: int = 0
    max_batch_size: int = 64
    max_input_tokens: int = 0
    io_binding: bool | None = None
    cuda_graphs: bool = True
    warmup: bool = True
    warmup_budget_s: float = 60.0
    device_id: int = 0


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def variant_preference(options: EngineOptions) -> list[str]:
    """Variants in the order the engine would take them (for hash-checking at load)."""
    if options.provider == "cuda" or (options.provider == "auto" and cuda_available()):
        return ["fp16", "fp32"]
    return [options.cpu_variant, "fp32"] if options.cpu_variant != "fp32" else ["fp32"]


def choose_runtime(options: EngineOptions, manifest: Manifest) -> tuple[str, str]:
    """(execution provider, variant) for this host and model."""
    if options.provider == "cuda" and not cuda_available():
        raise RuntimeError(
            "provider 'cuda' asked for, but onnxruntime has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu or use 'cpu'"
        )
    use_cuda = options.provider == "cuda" or (options.provider == "auto" and cuda_available())
    provider = CUDA if use_cuda else CPU
    for variant in variant_preference(options):
        if variant in manifest.variants:
            return provider, variant
    listed = sorted(manifest.variants)
    if use_cuda or not listed:
        raise RuntimeError(f"{manifest.name}/{manifest.version}: no usable variant in {listed}")
    return provider, listed[0]


def bucket(n: int, minimum: int, maximum: int) -> int:
    """Smallest power-of-two multiple of `minimum` >= n, capped at `maximum` (>= n)."""
    if n > maximum:
        raise ValueError(f"{n} exceeds the largest bucket {maximum}")
    b = max(1, minimum)
    while b < n:
        b *= 2
    return min(b, maximum)


def buckets(minimum: int, maximum: int) -> list[int]:
    out, b = [], max(1, minimum)
    while b < maximum:
        out.append(b)
        b *= 2
    out.append(maximum)
    return sorted(set(out))


def cgroup_cpus(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPUs this process's cgroup may use (CFS quota / period; the least of its cgroup
    and those above it), None when no quota is set or none can be read. A container limited
    to 2 CPUs on a 64-core node still has 64 cores in its affinity, and 64 intra-op threads
    there would be throttled in every period."""
    limits: list[float] = []
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # cgroup v2: "0::/path"; the quota may sit on any level above
        if line.startswith("0::"):
            folder = root / line[3:].strip().lstrip("/")
            for level in (folder, *folder.parents):
                limits += _quota(level / "cpu.max")
                if level == root:
                    break
    for v1 in ("cpu", "cpu,cpuacct"):  # cgroup v1, as a container sees its own
        limits += _quota(root / v1 / "cpu.cfs_quota_us", root / v1 / "cpu.cfs_period_us")
    return min(limits, default=None)


def _quota(path: Path, period_path: Path | None = None) -> list[float]:
    """[quota / period] from cpu.max ("200000 100000"; "max ..." is none) or from v1's two
    files (quota -1 is none); [] when absent or unreadable."""
    try:
        if period_path is None:
            quota, period = path.read_text().split()[:2]
        else:
            quota, period = path.read_text().strip(), period_path.read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0 or int(quota) <= 0:
            return []
        return [int(quota) / int(period)]
    except (OSError, ValueError):
        return []


def _threads(requested: int) -> int:
    """intra-op threads: as set, else the cores this process may run on, within its
    cgroup's CPU quota (rounded up)."""
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


# --- numpy decoding helpers ------------------------------------------------------------------


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    u: np.ndarray,
) -> np.ndarray:
    """Sampled ids [n] from logits [n, V] with per-row temperature, top-k, top-p and one
    uniform draw u per row: the reference's inverse-CDF rule, vectorized over rows."""
    n, vocab = logits.shape
    scaled = logits.astype(np.float32) / temperature.astype(np.float32)[:, None]
    # Probability-descending order, ties to the lower id (stable sort of the negation).
    order = np.argsort(-scaled, axis=-1, kind="stable")
    ordered = np.take_along_axis(scaled, order, axis=-1)
    columns = np.arange(vocab)[None, :]
    k = top_k[:, None]
    ordered = np.where((k > 0) & (k < vocab) & (columns >= k), _NEG_INF, ordered)
    shifted = ordered - ordered[:, :1]
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    mass_before = np.cumsum(probs, axis=-1) - probs
    outside = (mass_before >= top_p.astype(np.float32)[:, None]) & (top_p[:, None] < 1.0)
    outside[:, 0] = False  # the most likely token always stays
    probs = np.where(outside, np.float32(0.0), probs)
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    target = u * cdf[:, -1]
    index = np.minimum((cdf <= target[:, None]).sum(axis=-1), vocab - 1)
    return order[np.arange(n), index]


def top_in_order(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m best scores, best first, ties to the lower index: what a stable
    descending sort gives, without sorting the whole row."""
    m = min(m, scores.size)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, m - 1)[:m]
    threshold = scores[part].min()
    greater = np.flatnonzero(scores > threshold)
    equal = np.flatnonzero(scores == threshold)[: m - greater.size]
    chosen = np.concatenate([greater, equal])
    return chosen[np.lexsort((chosen, -scores[chosen]))]


# --- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupReport:
    shapes: int
    seconds: float
    # The scheduler's first estimates (empty, 0 when stopped: none was timed): one decoder
    # step per row bucket at a typical cache (64), and the encoder's (translator) or
    # prefill's (generator) seconds per input token taking in 8 inputs of 64 tokens.
    step_seconds: dict[int, float]
    admit_token_seconds: float = 0.0
    stopped: bool = False  # cut short by its stop event: the engine is not to serve


class Engine:
    """Sessions, tokenizer and limits of one model version; makes batches."""

    def __init__(
        self, path: str | Path, manifest: Manifest, options: EngineOptions | None = None
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.options = options or EngineOptions()
        self.name = manifest.name
        self.version = manifest.version
        self.task = Task(manifest.task)
        self.provider, self.variant = choose_runtime(self.options, manifest)
        wanted = variant_preference(self.options)[0]
        if self.variant != wanted:
            log.warning(
                "%s/%s has no %s graph (variants: %s): serving %s; `make export` builds them all",
                manifest.name, manifest.version, wanted, ", ".join(sorted(manifest.variants)),
                self.variant,
            )  # fmt: skip
        self.float_dtype: type = np.float16 if self.variant == "fp16" else np.float32
        self.layers = manifest.cache.layers
        self.heads = manifest.cache.heads
        self.head_dim = manifest.cache.head_dim
        self.vocab_size = manifest.vocab_size
        self.max_positions = manifest.limits.max_positions
        self.max_input_tokens = min(
            manifest.limits.max_input_tokens,
            self.options.max_input_tokens or manifest.limits.max_input_tokens,
        )
        self.max_new_tokens = manifest.limits.max_new_tokens
        self.max_batch_size = self.options.max_batch_size
        ids = manifest.special_ids
        self.pad_id, self.eos_id, self.bos_id = ids.pad_id, ids.eos_id, ids.bos_id
        self.start_id = ids.decoder_start_id
        self.tokenizer = Tokenizer(
            self.path / manifest.tokenizer.path,
            ids.bos_id,
            ids.eos_id,
            continuation=self.task is Task.GENERATION,
        )
        self.threads = _threads(self.options.intra_op_threads)
        so = session_options(self.threads, device=self.provider == CUDA)
        if self.provider == CUDA and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()

        bound = (
            self.options.io_binding
            if self.options.io_binding is not None
            else self.provider == CUDA
        )
        self.io_binding = bound
        static = bound and self.options.cuda_graphs
        capture = static and self.provider == CUDA
        if capture and not graphs_supported(ort.__version__):
            log.warning(
                "%s/%s: no CUDA graphs with onnxruntime %s (they need %s or later)",
                self.name, self.version, ort.__version__, ".".join(map(str, MIN_GRAPH_ORT)),
            )  # fmt: skip
            capture = False
        # On fixed buffers the decoder also reduces its greedy rows (one run per step).
        fused: bytes | None = None
        if static:
            try:
                fused = decoder_with_greedy(
                    self.path / manifest.graph(self.variant, "decoder").path
                )
            except Exception as error:
                log.warning("%s/%s: greedy stays a helper run (%s)", self.name, self.version, error)

        def session(graph: str, capture: bool = False) -> ort.InferenceSession:
            source: str | bytes = str(self.path / manifest.graph(self.variant, graph).path)
            if graph == "decoder" and fused is not None:
                source = fused
            chosen = providers_for(self.provider, self.options.device_id, capture)
            lock = DEVICE_LOCK.shared() if self.provider == CUDA else nullcontext()
            with lock:
                return ort.InferenceSession(source, so, providers=chosen)

        try:
            self.backend: Backend = self._open(session, bound, static, capture)
        except BaseException as error:
            self._drop_partial(error)
            raise
        self.warmup_report: WarmupReport | None = None
        log.info(
            "engine %s/%s: %s, variant %s, %d threads, io_binding=%s, cuda_graphs=%s",
            self.name, self.version, self.provider, self.variant, self.threads, bound,
            bool(getattr(self.backend, "capture", False)),
        )  # fmt: skip

    def _open(
        self,
        session: Callable[..., ort.InferenceSession],
        bound: bool,
        static: bool,
        capture: bool,
    ) -> Backend:
        """The sessions and the backend that runs them (capture off where the decoder
        cannot be made with it)."""
        decoder = None
        if capture:
            try:
                decoder = session("decoder", capture=True)
            except Exception as error:  # e.g. a node onnxruntime keeps off the GPU
                log.warning("%s/%s: no CUDA graphs (%s)", self.name, self.version, error)
                capture = False
        if decoder is None:
            decoder = session("decoder")
        encoder = session("encoder") if self.task is Task.TRANSLATION else None
        actual = decoder.get_providers()[0]
        if actual != self.provider:
            raise RuntimeError(
                f"{self.name}/{self.version}: asked for {self.provider}, got {actual}"
            )
        return (
            BoundBackend(
                decoder,
                encoder,
                self.float_dtype,
                self.provider,
                self.options.device_id,
                self.threads,
                self.vocab_size,
                static=static,
                capture=capture,
                plain_decoder=(lambda: session("decoder")) if capture else None,
            )
            if bound
            else NumpyBackend(decoder, encoder, self.float_dtype)
        )

    def _drop_partial(self, error: BaseException) -> None:
        """Free what a failed `_open` made, now and under the lock held alone, as close()
        does: left to the garbage collector, the sessions would go with the traceback, on
        any thread, perhaps during another model's capture. Its frames' locals are cleared
        (their lines stay in the traceback): they are what still holds the sessions."""
        with DEVICE_LOCK.exclusive() if self.provider == CUDA else nullcontext():
            traceback.clear_frames(error.__traceback__)
            gc.collect()

    # --- facts ---------------------------------------------------------------------------

    @property
    def config_json(self) -> str:
        return json.dumps(self.manifest.config, sort_keys=True)

    @property
    def cuda_graphs(self) -> bool | None:
        """Whether decode steps replay as CUDA graphs (False once they fell back); None
        where they do not apply: on the CPU, or with `cuda_graphs` off."""
        if self.provider != CUDA or not self.options.cuda_graphs:
            return None
        return bool(getattr(self.backend, "capture", False))

    @property
    def row_buckets(self) -> list[int]:
        return buckets(1, bucket(self.max_batch_size, 1, 1 << 30))

    @property
    def cache_buckets(self) -> list[int]:
        return buckets(min(MIN_CACHE, self.max_positions), self.max_positions)

    @property
    def source_buckets(self) -> list[int]:
        return buckets(min(MIN_CACHE, self.max_input_tokens), self.max_input_tokens)

    # Cache and source lengths the batch takes. With IOBinding (CUDA) every length is a
    # warmed-up power of two (kernels are chosen per shape there). On the CPU a new shape
    # costs nothing to set up while attention reads every cache slot, used or not, at every
    # step, so lengths follow the live rows in steps of MIN_CACHE.

    def cache_for(self, n: int) -> int:
        return self._length_for(n, self.max_positions)

    def source_for(self, n: int) -> int:
        return self._length_for(n, self.max_input_tokens)

    def prefill_rows(self, width: int) -> int:
        """Most prompts one prefill run takes at `width`: the largest row bucket on a GPU
        (it has the memory, and each run costs its launches), on the CPU the largest power
        of two whose rows × width stay within PREFILL_TOKENS (one row at least)."""
        rows = bucket(self.max_batch_size, 1, 1 << 30)
        while self.provider != CUDA and rows > 1 and rows * width > PREFILL_TOKENS:
            rows //= 2
        return rows

    def _length_for(self, n: int, maximum: int) -> int:
        smallest = min(MIN_CACHE, maximum)
        if self.io_binding:
            return bucket(n, smallest, maximum)
        if n > maximum:
            raise ValueError(f"{n} exceeds the largest bucket {maximum}")
        return min(maximum, max(smallest, -(-n // MIN_CACHE) * MIN_CACHE))

    # --- admission -----------------------------------------------------------------------

    @property
    def overlaps_admission(self) -> bool:
        """Whether a batch's newcomers may be encoded (or prefilled) in another thread
        while it steps (`prepare`, then `Batch.add`). On the CPU the step leaves cores idle
        that the encoder then uses. A device backend steps on buffers bound per shape and
        graphs captured from one thread, so there newcomers join between steps."""
        return isinstance(self.backend, NumpyBackend)

    def prepare(self, items: Sequence[BatchItem]) -> Prepared:
        """The newcomers' encoder run (translator) or prefill runs (generator), which need
        no batch: `Batch.add` lays what they computed into its rows. Where
        `overlaps_admission`, another thread may run it while a batch steps."""
        keys = tuple(it.key for it in items)
        lengths = [len(it.input_ids) for it in items]
        if self.task is Task.TRANSLATION:
            if isinstance(self.backend, NumpyBackend):
                # On the CPU a new shape costs nothing to set up, and every padded slot
                # costs compute in a call all running rows wait for: encode at the exact
                # size.
                n, width = len(items), max(lengths)
            else:
                n = bucket(len(items), 1, bucket(self.max_batch_size, 1, 1 << 30))
                width = bucket(
                    max(lengths), min(MIN_CACHE, self.max_input_tokens), self.max_input_tokens
                )
            ids = np.full((n, width), self.pad_id, dtype=np.int64)
            mask = np.zeros((n, width), dtype=bool)
            for i, it in enumerate(items):
                ids[i, : lengths[i]] = it.input_ids
                mask[i, : lengths[i]] = True
            ck, cv = self.backend.encode(ids, mask)
            padding = 1.0 - sum(lengths) / float(n * width)
            return Prepared(keys, width, padding, [(list(range(len(items))), ck, cv)], mask)
        # A prompt's every token but the last goes into the cache; the next step feeds it.
        todo = [i for i, n in enumerate(lengths) if n > 1]
        if not todo:
            return Prepared(keys, 0, 0.0, [])
        width = self.cache_for(max(lengths[i] - 1 for i in todo))
        group = self.prefill_rows(width)
        parts: list[tuple[list[int], Any, Any]] = []
        padded = 0
        for first in range(0, len(todo), group):
            part = todo[first : first + group]
            n = bucket(len(part), 1, group)
            padded += n * width
            ids = np.full((n, width), self.pad_id, dtype=np.int64)
            for row, i in enumerate(part):
                prompt = items[i].input_ids[:-1]
                ids[row, : len(prompt)] = prompt
            feeds = {
                "input_ids": ids,
                "positions": np.zeros(n, dtype=np.int64),
                "past_k": self.backend.zeros((self.layers, n, self.heads, width, self.head_dim)),
                "past_v": self.backend.zeros((self.layers, n, self.heads, width, self.head_dim)),
            }
            _, pk, pv, _ = self.backend.decode(feeds, want_alignment=False)
            parts.append((part, pk, pv))
        real = sum(lengths[i] - 1 for i in todo)
        return Prepared(keys, width, 1.0 - real / float(padded), parts)

    # --- requests ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Input ids of a request's text (translator: + EOS; generator: BOS +)."""
        if self.task is Task.TRANSLATION:
            return self.tokenizer.encode_source(text)
        return self.tokenizer.encode_prompt(text)

    def _positions_left(self, input_ids: Sequence[int]) -> int:
        """Tokens the decoder can still generate: a prompt's tokens but its last take
        positions (the last is fed at the first step); a translator's source does not."""
        if self.task is Task.GENERATION:
            return self.max_positions - len(input_ids) + 1
        return self.max_positions

    def fit(self, request: SequenceRequest, input_ids: Sequence[int]) -> SequenceRequest:
        """A request whose max_new_tokens is the server's default, lowered to what this
        model can decode after its input (its own limit, and for a prompt the positions
        left); a value the caller set is kept, and `check` refuses it if it does not fit."""
        p = request.params
        if not p.max_new_tokens_default:
            return request
        fitted = min(p.max_new_tokens, self.max_new_tokens, self._positions_left(input_ids))
        if fitted < 1 or fitted == p.max_new_tokens:
            return request  # nothing fits (check says why), or nothing to lower
        return replace(request, params=replace(p, max_new_tokens=fitted))

    def check(
        self, request: SequenceRequest, input_ids: list[int], max_input_tokens: int | None = None
    ) -> None:
        """Refuse what this model cannot decode, naming the field and the limit."""
        p = request.params
        limit = (
            self.max_input_tokens
            if max_input_tokens is None
            else min(max_input_tokens, self.max_input_tokens)
        )
        if len(input_ids) > limit:
            raise InvalidArgument(
                "text", f"{len(input_ids)} tokens exceed max_input_tokens {limit}"
            )
        specials = (self.tokenizer.bos_id, self.tokenizer.eos_id)
        if all(i in specials for i in input_ids):  # e.g. only U+FFFD or U+2581
            raise InvalidArgument(
                "text", "is empty once tokenized: the tokenizer drops every character of it"
            )
        if p.max_new_tokens < 1:
            raise InvalidArgument("options.max_new_tokens", f"must be >= 1, got {p.max_new_tokens}")
        if p.max_new_tokens > self.max_new_tokens:
            raise InvalidArgument(
                "options.max_new_tokens",
                f"{p.max_new_tokens} exceeds this model's limit {self.max_new_tokens}",
            )
        if p.max_new_tokens > self._positions_left(input_ids):
            raise InvalidArgument(
                "options.max_new_tokens",
                f"prompt ({len(input_ids)} tokens) + max_new_tokens ({p.max_new_tokens}) - 1 "
                f"exceeds the model's max_positions {self.max_positions}: at most "
                f"{self._positions_left(input_ids)} for this prompt"
                if self.task is Task.GENERATION
                else f"{p.max_new_tokens} exceeds the model's max_positions {self.max_positions}",
            )
        for i, stop in enumerate(p.stop):
            char = self.tokenizer.never_decoded(stop)
            if char is not None:
                raise InvalidArgument(
                    f"options.stop[{i}]",
                    f"holds {char!r}, which this model's output never does: its tokenizer "
                    "turns line breaks and tabs into spaces, drops zero-width characters "
                    "and has no piece for characters outside its vocabulary",
                )
        if p.return_alignment and self.task is not Task.TRANSLATION:
            raise InvalidArgument(
                "options.return_alignment", "only translation models have cross-attention"
            )
        if p.beam_size < 1 or p.n_best < 1 or p.n_best > p.beam_size:
            raise InvalidArgument(
                "options.n_best", f"{p.n_best} must be in [1, beam_size={p.beam_size}]"
            )
        if p.beam_size > self.max_batch_size:
            raise InvalidArgument(
                "options.beam_size", f"{p.beam_size} exceeds max_batch_size {self.max_batch_size}"
            )
        if p.sampling and p.beam_size > 1:
            raise InvalidArgument(
                "options.beam_size", "sampling (temperature > 0) needs beam_size 1"
            )

    def new_batch(self, compact: bool = True) -> Batch:
        return Batch(self, compact)

    def close(self) -> None:
        """Free the sessions and device buffers now (a retired version): see
        BoundBackend.close for why not whenever the garbage collector gets to them."""
        self.backend.close()

    # --- warm-up -------------------------------------------------------------------------

    def warmup(self, stop: threading.Event | None = None) -> WarmupReport:
        """Run the shape buckets the batch will use once, so no request pays for a first
        run (allocator growth; on CUDA, kernel choice per shape): on CUDA every combination,
        on CPU every (rows, capacity) pair plus the source and prefill lengths at the edges.
        Stops after `warmup_budget_s`. Also times one step per row bucket for the
        scheduler's estimates.

        `stop`, set from another thread (the scheduler's stop()), ends it at the next shape:
        a server told to stop while it starts exits in seconds, not after the whole warm-up
        (a minute on a GPU). The report then says `stopped`, no step is timed (nor is
        `warmup_report` set), and the engine is not to serve."""
        start = time.perf_counter()
        budget = self.options.warmup_budget_s
        full = self.provider == CUDA
        rows, caches, sources = self.row_buckets, self.cache_buckets, self.source_buckets
        translator = self.task is Task.TRANSLATION
        src_list = sources if translator else [0]
        # Decoder: every (rows, capacity) pair; on CUDA every source length too (kernels
        # are chosen per shape there), on CPU the source lengths at the largest batch.
        shapes = [
            (r, c, s) for r in rows for c in caches for s in (src_list if full else src_list[:1])
        ]
        if not full:
            shapes += [(rows[-1], caches[-1], s) for s in src_list]
        runs = [partial(self._run_decoder_zeros, r, c, s, 1) for r, c, s in dict.fromkeys(shapes)]
        if translator:
            enc = (
                [(n, s) for n in rows for s in sources]
                if full
                else [(1, sources[0]), (rows[-1], sources[-1])]
            )
            runs += [partial(self._run_encoder_zeros, n, s) for n, s in enc]
        else:
            # On the CPU the most rows a prefill takes at the narrowest width (not the row
            # bucket: past PREFILL_TOKENS it is never run, and would grow the arena the
            # groups keep small) and the widest group.
            pre = (
                [(n, t) for n in rows for t in caches if n <= self.prefill_rows(t)]
                if full
                else [(1, t) for t in caches]
                + [(self.prefill_rows(caches[0]), caches[0]), self._widest_prefill()]
            )
            runs += [partial(self._run_decoder_zeros, n, t, 0, t) for n, t in pre]
        count = 0
        for run in runs:
            if stop is not None and stop.is_set():
                break
            if time.perf_counter() - start > budget:
                log.warning(
                    "%s/%s: warm-up budget %.0fs spent after %d shapes",
                    self.name,
                    self.version,
                    budget,
                    count,
                )
                break
            run()
            count += 1
        if stop is not None and stop.is_set():
            log.info(
                "%s/%s warm-up stopped after %d of %d shapes: asked to stop",
                self.name, self.version, count, len(runs),
            )  # fmt: skip
            return WarmupReport(count, time.perf_counter() - start, {}, 0.0, stopped=True)
        # One step per row bucket at a typical cache, the fastest of three after a warm-up
        # run: the scheduler's first estimates (a step's time grows with its rows: on this
        # project's CPU 1.6 ms at 1 row, 12-17 ms at 64 for en-es). Its inputs are made
        # before the clock starts: allocating en-es's 64-row caches (about 100 MB of
        # zeros) in the loading thread tripled the time read (45 ms against 12 in the
        # main thread), and the scheduler then refused bursts it could serve.
        c = min(caches[-1], 64)
        s = min(src_list[-1], 64) if translator else 0
        step: dict[int, float] = {}
        for r in rows:
            timed = partial(self._run_decoder, self._zero_feeds(r, c, s, 1), r, 1)
            timed()
            step[r] = min(self._timed(timed) for _ in "123")
        n = min(8, rows[-1])
        if translator:
            width = s
            admit = partial(self._run_encoder_zeros, n, width)
        else:
            width = c
            n = min(n, self.prefill_rows(width))
            admit = partial(self._run_decoder, self._zero_feeds(n, width, 0, width), n, width)
        admit()
        per_token = min(self._timed(admit) for _ in "123") / (n * width)
        self.warmup_report = WarmupReport(count, time.perf_counter() - start, step, per_token)
        log.info(
            "%s/%s warm-up: %d shapes in %.2fs, step %.1f ms at 1 row, %.1f ms at %d, "
            "%.3f ms per input token",
            self.name, self.version, count, self.warmup_report.seconds, step[rows[0]] * 1e3,
            step[rows[-1]] * 1e3, rows[-1], per_token * 1e3,
        )  # fmt: skip
        return self.warmup_report

    @staticmethod
    def _timed(run: Callable[[], None]) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def _widest_prefill(self) -> tuple[int, int]:
        """(rows, width) of the largest prefill run: the most rows at the widest prompt."""
        width = self.cache_for(max(1, self.max_input_tokens - 1))
        return self.prefill_rows(width), width

    def _run_decoder_zeros(self, r: int, c: int, s: int, t: int) -> None:
        self._run_decoder(self._zero_feeds(r, c, s, t), r, t)

    def _zero_feeds(self, r: int, c: int, s: int, t: int) -> dict[str, Any]:
        source = s if self.task is Task.TRANSLATION else None
        shape = (self.layers, self.heads, self.head_dim)
        return zero_step(self.backend, shape, r, c, source, t, self.pad_id)

    def _run_decoder(self, feeds: dict[str, Any], r: int, t: int) -> None:
        logits, _, _, _ = self.backend.decode(feeds, want_alignment=False)
        if t == 1:
            self.backend.greedy(logits, np.arange(r))

    def _run_encoder_zeros(self, n: int, s: int) -> None:
        ids = np.full((n, s), self.pad_id, dtype=np.int64)
        self.backend.encode(ids, np.ones((n, s), dtype=bool))


# --- batch ------------------------------------------------------------------------------------


@dataclass
class BatchItem:
    """A request joining the batch: `key` identifies it in the step outputs."""

    key: Hashable
    request: SequenceRequest
    input_ids: list[int]
    stream: bool = False


@dataclass
class AddOutput:
    rows: int
    padding_ratio: float  # padded / total tokens of the encoder or prefill call
    seconds: float


@dataclass
class Prepared:
    """What `Engine.prepare` computed for the newcomers `keys`, in their order: per run,
    the newcomers it took (indices into `keys`) and their keys and values, encoder outputs
    [L, n, H, width, D] (translator) or prompt caches of `width` slots (generator)."""

    keys: tuple[Hashable, ...]
    width: int
    padding_ratio: float  # padded / total tokens of the runs
    parts: list[tuple[list[int], Any, Any]]
    src_mask: np.ndarray | None = None  # translator: [n, width]


@dataclass
class StepOutput:
    """What one step produced. `events` only for streaming requests; `progressed` lists
    every request that generated a token (for time-to-first-token and inter-token metrics;
    a step that ends a request with EOS generated none)."""

    events: list[tuple[Hashable, TokenEvent]] = field(default_factory=list)
    finished: list[tuple[Hashable, SequenceResult]] = field(default_factory=list)
    progressed: list[Hashable] = field(default_factory=list)
    rows: int = 0
    capacity: int = 0
    padding_ratio: float = 0.0
    seconds: float = 0.0
    run_seconds: float = 0.0  # of `seconds`, inside onnxruntime runs (the rest: host work)


@dataclass
class _Hyp:
    tokens: list[int]
    score: float
    normalized: float
    reason: FinishReason
    alignment: list[list[float]] | None
    text: str | None = None  # set when a stop string cut it


class _Seq:
    """One request in the batch: its rows (K beams or 1) and decoding state."""

    def __init__(self, item: BatchItem, slots: list[int], tokenizer: Tokenizer) -> None:
        self.key = item.key
        self.request = item.request
        self.params: DecodingParams = item.request.params
        self.input_ids = item.input_ids
        self.stream = item.stream
        self.slots = slots
        # A language model's text follows its prompt: see Tokenizer.after.
        self.tokenizer = tokenizer.after(item.request.text)
        self.beam = self.params.beam_size > 1
        k = len(slots)
        self.tokens: list[list[int]] = [[] for _ in range(k)]
        self.aligns: list[list[list[float]]] = [[] for _ in range(k)]
        self.scores = np.array([0.0] + [-np.inf] * (k - 1), dtype=np.float32)
        self.pool: list[_Hyp] = []
        self.steps = 0
        self.stop = tuple(tokenizer.output_form(s) for s in self.params.stop)
        self.stop_len = max((len(s) for s in self.stop), default=0)
        # Nothing to decode, search or stream per step: only EOS or the length ends it.
        self.plain = not (self.params.return_alignment or self.stop or self.stream)
        # Text length already searched for stop strings: the text's settled part, without a
        # trailing incomplete character, whose marks (one per byte piece so far) shrink to
        # the one character it becomes.
        self.checked = 0
        # The text of the best row so far, for a row streamed or searched for stops.
        self.text = TextSoFar(self.tokenizer)
        self.emitted_ids = 0
        self.emitted_text = ""
        self.rng: np.random.Generator | None = None
        if self.params.sampling:
            self.rng = np.random.default_rng(self.params.seed)


class Batch:
    """The running rows of one model version. Not thread-safe: one thread drives it.

    compact: shrink the rows, cache length and source width to what the live rows need as
    requests leave. False keeps every row and the longest lengths in each step until the
    batch empties, a finished request's rows computed as padding, as a batched generate
    call does (the static-padded baseline)."""

    def __init__(self, engine: Engine, compact: bool = True) -> None:
        self.engine = engine
        self.compact = compact
        self.backend = engine.backend
        e = engine
        self._cache_shape = (e.layers, e.heads, e.head_dim)
        self.capacity = 0  # R
        self.cache_len = 0  # C
        self.source_len = 0  # S
        self.past_k: Any = None
        self.past_v: Any = None
        self.cross_k: Any = None
        self.cross_v: Any = None
        self.src_mask = np.zeros((0, 0), dtype=bool)
        self.positions = np.zeros(0, dtype=np.int64)
        self.next_ids = np.zeros(0, dtype=np.int64)
        self.active = np.zeros(0, dtype=bool)
        self.src_len = np.zeros(0, dtype=np.int64)
        self.seqs: dict[Hashable, _Seq] = {}
        self.buffers = self.backend.new_buffers(self)  # fixed step buffers (CUDA graphs)

    # --- facts ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def rows(self) -> int:
        return int(self.active.sum())

    @property
    def free_rows(self) -> int:
        return self.engine.max_batch_size - self.rows

    def keys(self) -> list[Hashable]:
        return list(self.seqs)

    def generated(self, key: Hashable) -> int:
        """Tokens generated so far by a request (steps run)."""
        return self.seqs[key].steps

    # --- layout --------------------------------------------------------------------------

    def _alloc(self, rows: int, cache_len: int, source_len: int) -> None:
        L, H, D = self._cache_shape
        b = self.backend
        self.capacity, self.cache_len = rows, cache_len
        self.past_k = b.zeros((L, rows, H, cache_len, D))
        self.past_v = b.zeros((L, rows, H, cache_len, D))
        if self.engine.task is Task.TRANSLATION:
            self.source_len = source_len
            self.cross_k = b.zeros((L, rows, H, source_len, D))
            self.cross_v = b.zeros((L, rows, H, source_len, D))
        self.src_mask = np.zeros((rows, source_len), dtype=bool)
        self.positions = np.zeros(rows, dtype=np.int64)
        self.next_ids = np.full(rows, self.engine.pad_id, dtype=np.int64)
        self.active = np.zeros(rows, dtype=bool)
        self.src_len = np.zeros(rows, dtype=np.int64)

    def _relayout(self, rows: int) -> None:
        """Move the active rows to the front of a batch of `rows` slots (grow or compact),
        and shrink the cache and source lengths to what the remaining rows need."""
        keep = np.flatnonzero(self.active)
        if keep.size > rows:
            raise ValueError(f"{keep.size} active rows do not fit {rows}")
        perm = np.zeros(rows, dtype=np.int64)
        perm[: keep.size] = keep
        b = self.backend
        self.past_k = b.gather(self.past_k, perm)
        self.past_v = b.gather(self.past_v, perm)
        if self.cross_k is not None:
            self.cross_k = b.gather(self.cross_k, perm)
            self.cross_v = b.gather(self.cross_v, perm)
        new_slot = {int(old): new for new, old in enumerate(keep)}
        for seq in self.seqs.values():
            seq.slots = [new_slot[s] for s in seq.slots]
        filler = np.arange(rows) >= keep.size
        self.src_mask = self.src_mask[perm]
        self.positions = np.where(filler, 0, self.positions[perm])
        self.next_ids = np.where(filler, self.engine.pad_id, self.next_ids[perm])
        self.active = ~filler
        self.src_len = np.where(filler, 0, self.src_len[perm])
        self.capacity = rows
        if keep.size:
            e = self.engine
            need_c = e.cache_for(int(self.positions[: keep.size].max()) + 1)
            if need_c < self.cache_len:
                self.past_k = b.resize(self.past_k, need_c)
                self.past_v = b.resize(self.past_v, need_c)
                self.cache_len = need_c
            if self.cross_k is not None:
                need_s = e.source_for(int(self.src_len[: keep.size].max()))
                if need_s < self.source_len:
                    self._resize_source(need_s)

    def _oversized(self) -> bool:
        """Whether the cache length or source width is a bucket larger than the live rows
        need (a long request has left), so the next step would pay for nothing."""
        e = self.engine
        live = self.active
        if e.cache_for(int(self.positions[live].max()) + 1) < self.cache_len:
            return True
        if self.cross_k is None:
            return False
        return e.source_for(int(self.src_len[live].max())) < self.source_len

    def _resize_source(self, length: int) -> None:
        b = self.backend
        self.cross_k = b.resize(self.cross_k, length)
        self.cross_v = b.resize(self.cross_v, length)
        mask = np.zeros((self.capacity, length), dtype=bool)
        keep = min(length, self.source_len)
        mask[:, :keep] = self.src_mask[:, :keep]
        self.src_mask = mask
        self.source_len = length

    def _grow_cache(self, length: int) -> None:
        if length > self.cache_len:
            self.past_k = self.backend.resize(self.past_k, length)
            self.past_v = self.backend.resize(self.past_v, length)
            self.cache_len = length

    # --- admission -----------------------------------------------------------------------

    def add(self, items: Sequence[BatchItem], prepared: Prepared | None = None) -> AddOutput:
        """Admit requests between steps: translator sources are encoded together, prompts
        prefilled together (here, or beforehand by `Engine.prepare`, which may run while
        the batch steps); each joins the next `step()`."""
        start = time.perf_counter()
        e = self.engine
        if not items:
            return AddOutput(0, 0.0, 0.0)
        if prepared is not None and prepared.keys != tuple(it.key for it in items):
            raise ValueError("prepared for other requests than those added")
        need = sum(it.request.params.beam_size for it in items)
        if self.rows + need > e.max_batch_size:
            raise ValueError(
                f"{need} rows do not fit: {self.rows} running, max_batch_size {e.max_batch_size}"
            )
        for it in items:
            if it.key in self.seqs:
                raise ValueError(f"request {it.key!r} is already in the batch")
        if self.rows == 0:
            self.seqs.clear()
            self.capacity = 0  # start afresh: smallest buckets again
        min_c = min(MIN_CACHE, e.max_positions)
        min_s = min(MIN_CACHE, e.max_input_tokens)
        if self.capacity == 0:
            rows = bucket(need, 1, bucket(e.max_batch_size, 1, 1 << 30))
            self._alloc(rows, min_c, min_s if e.task is Task.TRANSLATION else 0)
        elif not self.compact:  # a padded batch keeps its rows and layout until it empties
            raise ValueError(f"a padded batch takes rows only when empty ({self.rows} running)")
        elif int((~self.active).sum()) < need:
            self._relayout(bucket(self.rows + need, 1, bucket(e.max_batch_size, 1, 1 << 30)))
        free = list(np.flatnonzero(~self.active))
        seqs: list[_Seq] = []
        for it in items:
            k = it.request.params.beam_size
            slots, free = [int(s) for s in free[:k]], free[k:]
            seqs.append(_Seq(it, slots, e.tokenizer))
        dst = np.array([s for seq in seqs for s in seq.slots], dtype=np.int64)
        src = np.array([i for i, seq in enumerate(seqs) for _ in seq.slots], dtype=np.int64)
        if prepared is None:
            prepared = e.prepare(items)
        if e.task is Task.TRANSLATION:
            self._encode(prepared, seqs, dst, src)
        else:
            self._prefill(prepared, seqs, dst, src)
        for seq in seqs:
            self.seqs[seq.key] = seq
        self.active[dst] = True
        return AddOutput(len(dst), prepared.padding_ratio, time.perf_counter() - start)

    def _encode(
        self, prepared: Prepared, seqs: list[_Seq], dst: np.ndarray, src: np.ndarray
    ) -> None:
        """Encoder outputs into the newcomers' rows, the batch's source width grown (or
        theirs padded) to match."""
        _, ck, cv = prepared.parts[0]  # one encoder run takes every newcomer
        mask, width = prepared.src_mask, prepared.width
        assert mask is not None
        if width > self.source_len:
            self._resize_source(width)
        elif width < self.source_len:
            ck = self.backend.resize(ck, self.source_len)
            cv = self.backend.resize(cv, self.source_len)
            mask = np.pad(mask, ((0, 0), (0, self.source_len - width)))
        self.cross_k = self.backend.assign(self.cross_k, dst, ck, src)
        self.cross_v = self.backend.assign(self.cross_v, dst, cv, src)
        self.src_mask[dst] = mask[src]
        self.src_len[dst] = np.array([len(seq.input_ids) for seq in seqs])[src]
        self.positions[dst] = 0
        self.next_ids[dst] = self.engine.start_id

    def _prefill(
        self, prepared: Prepared, seqs: list[_Seq], dst: np.ndarray, src: np.ndarray
    ) -> None:
        """Prompt caches into the newcomers' rows; each row's last prompt token is fed by
        the next step."""
        lengths = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
        self.positions[dst] = lengths[src] - 1
        self.next_ids[dst] = [seqs[i].input_ids[-1] for i in src]
        if not prepared.parts:
            return
        self._grow_cache(prepared.width)
        for part, pk, pv in prepared.parts:
            if prepared.width < self.cache_len:
                pk = self.backend.resize(pk, self.cache_len)
                pv = self.backend.resize(pv, self.cache_len)
            row_of = {i: row for row, i in enumerate(part)}
            pairs = [
                (int(d), row_of[int(s)]) for d, s in zip(dst, src, strict=True) if int(s) in row_of
            ]
            pd = np.array([d for d, _ in pairs], dtype=np.int64)
            ps = np.array([s for _, s in pairs], dtype=np.int64)
            self.past_k = self.backend.assign(self.past_k, pd, pk, ps)
            self.past_v = self.backend.assign(self.past_v, pd, pv, ps)

    # --- removal -------------------------------------------------------------------------

    def remove(self, keys: Sequence[Hashable]) -> list[tuple[Hashable, SequenceResult]]:
        """Drop requests now (cancelled, deadline passed); their rows are free for the next
        step. Returns what each had generated, finish reason CANCELLED."""
        out = []
        for key in keys:
            seq = self.seqs.get(key)
            if seq is None:
                continue
            best = int(np.argmax(seq.scores)) if seq.beam else 0
            hyp = _Hyp(
                seq.tokens[best], float(seq.scores[best]), float(seq.scores[best]),
                FinishReason.CANCELLED,
                seq.aligns[best] if seq.params.return_alignment else None,
            )  # fmt: skip
            out.append((key, self._result(seq, [hyp])))
            self._free(seq)
        return out

    def _free(self, seq: _Seq) -> None:
        slots = np.array(seq.slots, dtype=np.int64)
        self.active[slots] = False
        self.positions[slots] = 0
        self.next_ids[slots] = self.engine.pad_id
        self.src_len[slots] = 0
        self.seqs.pop(seq.key, None)

    # --- one step ------------------------------------------------------------------------

    def step_taking_in(
        self, items: Sequence[BatchItem], helper: futures.Executor | None
    ) -> tuple[AddOutput, StepOutput, float, Exception | None]:
        """Take the newcomers in and step: a continuous-batching round, the server's and
        the offline benchmark's alike. Where the engine allows it
        (`Engine.overlaps_admission`: pass a one-thread `helper`; elsewhere it is not used)
        and rows are running, the newcomers are encoded (or prefilled) by `helper` while
        those rows step, and join at the next step; else they are taken in first and join
        this one.
        Returns what was added (its seconds: those the round spent on it besides the
        step), the step's output, when its tokens existed (time.monotonic()), and why the
        newcomers were not taken in if their encoding failed apart from the step (the
        batch is then as it was: only they fail)."""
        if helper is None or not self.engine.overlaps_admission or not items or not len(self):
            added = self.add(items)
            out = self.step() if len(self) else StepOutput()
            return added, out, time.monotonic(), None
        pending = helper.submit(self.engine.prepare, items)
        try:
            out = self.step()
        finally:
            stepped = time.monotonic()
            futures.wait([pending])  # never leave it running on the engine's sessions
        try:
            prepared = pending.result()
        except Exception as error:
            return AddOutput(0, 0.0, time.monotonic() - stepped), out, stepped, error
        added = self.add(items, prepared)
        return replace(added, seconds=time.monotonic() - stepped), out, stepped, None

    def step(self) -> StepOutput:
        """One decoder call for every row, then each request's decoding rule."""
        start, runs_before = time.perf_counter(), self.backend.run_seconds
        out = StepOutput()
        if not self.seqs:
            return out
        e = self.engine
        active_rows = self.rows
        max_rows = bucket(e.max_batch_size, 1, 1 << 30)
        target = bucket(active_rows, 1, max_rows)
        if self.compact and (target * 2 <= self.capacity or self._oversized()):
            # Every step costs what its shapes cost, live or not: keep rows, cache length
            # and source width at what the live rows need, not the largest ever reached.
            self._relayout(target if target * 2 <= self.capacity else self.capacity)
        need_c = int(self.positions[self.active].max()) + 1
        if need_c > self.cache_len:
            self._grow_cache(e.cache_for(need_c))
        b = self.backend
        self.past_k = b.pin(self.past_k, "past_k", self.buffers)
        self.past_v = b.pin(self.past_v, "past_v", self.buffers)
        if self.cross_k is not None:
            self.cross_k = b.pin(self.cross_k, "cross_k", self.buffers)
            self.cross_v = b.pin(self.cross_v, "cross_v", self.buffers)
        want_align = any(s.params.return_alignment for s in self.seqs.values())
        feeds: dict[str, Any] = {
            "input_ids": self.next_ids[:, None].copy(),
            "positions": self.positions.copy(),
            "past_k": self.past_k,
            "past_v": self.past_v,
        }
        if e.task is Task.TRANSLATION:
            feeds["cross_k"] = self.cross_k
            feeds["cross_v"] = self.cross_v
            feeds["src_mask"] = self.src_mask
        logits, new_k, new_v, align3 = b.decode(feeds, want_align, self.buffers)
        self.past_k, self.past_v = b.write_kv(
            self.past_k, self.past_v, new_k, new_v, self.positions, self.buffers
        )
        align = None if align3 is None else align3[:, -1, :].astype(np.float32, copy=False)
        out.rows, out.capacity = active_rows, self.capacity
        out.padding_ratio = 1.0 - active_rows / float(self.capacity)

        singles = [s for s in self.seqs.values() if not s.beam]
        beams = [s for s in self.seqs.values() if s.beam]
        moves: list[tuple[int, int]] = []
        finished: list[tuple[_Seq, list[_Hyp]]] = []
        host: np.ndarray | None = None  # [B, V] float32, fetched only for sampling or beams
        if any(s.rng is not None for s in singles) or beams:
            host = self.backend.host_logits(logits)
        if singles:
            self._step_singles(singles, logits, host, align, out, finished)
        for seq in beams:
            assert host is not None
            hyps = self._step_beam(seq, host, align, moves)
            if hyps is None or hyps[0].reason is not FinishReason.EOS:
                out.progressed.append(seq.key)
            if hyps is not None:
                finished.append((seq, hyps))
            elif seq.stream:
                event = self._settled_beam_event(seq)
                if event is not None:
                    out.events.append((seq.key, event))
        if moves:
            dst = np.array([d for d, _ in moves], dtype=np.int64)
            src = np.array([s for _, s in moves], dtype=np.int64)
            self.past_k = self.backend.move(self.past_k, dst, src)
            self.past_v = self.backend.move(self.past_v, dst, src)
        self.positions[self.active] += 1
        for seq, hyps in finished:
            result = self._result(seq, hyps)
            if seq.stream:
                event = self._final_event(seq, result)
                if event is not None:
                    out.events.append((seq.key, event))
            out.finished.append((seq.key, result))
            self._free(seq)
        out.run_seconds = self.backend.run_seconds - runs_before
        out.seconds = time.perf_counter() - start
        return out

    def _step_singles(
        self,
        seqs: list[_Seq],
        logits: Any,
        host: np.ndarray | None,
        align: np.ndarray | None,
        out: StepOutput,
        finished: list[tuple[_Seq, list[_Hyp]]],
    ) -> None:
        """Greedy and sampled sequences: one row each, vectorized over rows. Greedy rows are
        reduced where the logits are (the backend's `greedy`); sampled rows need the
        distribution on the host."""
        slots = np.fromiter((s.slots[0] for s in seqs), np.int64, len(seqs))
        chosen = np.zeros(len(seqs), dtype=np.int64)
        picked = np.zeros(len(seqs), dtype=np.float32)
        sampled = [i for i, s in enumerate(seqs) if s.rng is not None]
        greedy = [i for i, s in enumerate(seqs) if s.rng is None]
        # A score is summed only for a request that asked for it (return_scores): the
        # others' read 0 (on every backend) and are never sent.
        scored = np.fromiter((s.params.return_scores for s in seqs), bool, len(seqs))
        if greedy:
            g = np.array(greedy, dtype=np.int64)
            chosen[g], picked[g] = self.backend.greedy(logits, slots[g], self.buffers, scored[g])
        if sampled:
            assert host is not None
            idx = np.array(sampled, dtype=np.int64)
            rows = host[slots[idx]]
            ps = [seqs[i].params for i in sampled]
            chosen[idx] = sample(
                rows,
                np.array([p.temperature for p in ps], dtype=np.float32),
                np.array([p.top_k for p in ps], dtype=np.int64),
                np.array([p.top_p for p in ps], dtype=np.float64),
                np.array([seqs[i].rng.random() for i in sampled]),  # type: ignore[union-attr]
            )
            want = scored[idx]
            if want.any():
                picked[idx[want]] = log_prob_of(rows[want], chosen[idx[want]])
        picked[~scored] = 0.0  # a device reduces every row's
        eos = self.engine.eos_id
        # Scores add up in float32, step by step (as the reference's do), all rows at once.
        scores = np.fromiter((s.scores[0] for s in seqs), np.float32, len(seqs)) + picked
        self.next_ids[slots] = chosen  # a row that finishes is reset when it is freed
        picks = chosen.tolist()
        out.progressed.extend(s.key for s, token in zip(seqs, picks, strict=True) if token != eos)
        for seq, token, score, slot in zip(
            seqs, picks, scores.tolist(), slots.tolist(), strict=True
        ):
            tokens = seq.tokens[0]
            tokens.append(token)
            seq.scores[0] = score
            seq.steps += 1
            if seq.plain:  # the common row: only EOS or its length can end it
                if token == eos:
                    hyp = _Hyp(tokens[:-1], score, score, FinishReason.EOS, None)
                    finished.append((seq, [hyp]))
                elif seq.steps >= seq.params.max_new_tokens:
                    hyp = _Hyp(list(tokens), score, score, FinishReason.LENGTH, None)
                    finished.append((seq, [hyp]))
                continue
            if seq.params.return_alignment and align is not None:
                seq.aligns[0].append(align[slot, : int(self.src_len[slot])].tolist())
            text: str | None = None
            found: _Hyp | None = None
            aligns = seq.aligns[0] if seq.params.return_alignment else None
            if token == eos:
                found = _Hyp(
                    tokens[:-1],
                    score,
                    score,
                    FinishReason.EOS,
                    None if aligns is None else aligns[:-1],
                )
            else:
                if seq.stop or seq.stream:
                    text = seq.text(tokens)
                if seq.stop and text is not None:
                    at = find_stop(text, seq.stop, max(0, seq.checked - seq.stop_len))
                    seq.checked = len(text.rstrip(REPLACEMENT))
                    if at >= 0:
                        keep = self._kept(seq.tokenizer, tokens, at)
                        found = _Hyp(
                            tokens[:keep], score, score, FinishReason.STOP,
                            None if aligns is None else aligns[:keep], text[:at],
                        )  # fmt: skip
                if found is None and seq.steps >= seq.params.max_new_tokens:
                    found = _Hyp(
                        list(tokens),
                        score,
                        score,
                        FinishReason.LENGTH,
                        None if aligns is None else list(aligns),
                    )
            if found is not None:
                finished.append((seq, [found]))
            elif seq.stream and text is not None:
                event = self._stream_event(seq, text)
                if event is not None:
                    out.events.append((seq.key, event))

    @staticmethod
    def _kept(tokenizer: Tokenizer, tokens: list[int], at: int) -> int:
        """How many leading tokens decode to text ending at or before `at` (the stop)."""
        keep = len(tokens)
        while keep > 0 and len(tokenizer.decode(tokens[:keep])) > at:
            keep -= 1
        return keep

    def _stream_event(
        self, seq: _Seq, text: str, tokens: list[int] | None = None
    ) -> TokenEvent | None:
        """New streamable text of `tokens` (default: the row's); token ids go out only with
        their whole text (nothing held back), so the streamed ids never include the tokens
        of a stop string."""
        tokens = seq.tokens[0] if tokens is None else tokens
        safe = stable_prefix(text, seq.stop)
        ids: list[int] = []
        if safe == text:
            ids = tokens[seq.emitted_ids :]
            seq.emitted_ids = len(tokens)
        delta = ""
        if len(safe) > len(seq.emitted_text) and safe.startswith(seq.emitted_text):
            delta = safe[len(seq.emitted_text) :]
            seq.emitted_text = safe
        return TokenEvent(ids, delta) if ids or delta else None

    def _settled_beam_event(self, seq: _Seq) -> TokenEvent | None:
        """A beam search's settled tokens: those every live beam and the best finished
        hypothesis share (a stream has one answer, and finished ones rank for good). The
        answer is one of them or extends a live beam, so they are its start whatever comes;
        they only grow."""
        settled = seq.tokens[0]
        contenders = seq.tokens[1:]
        if seq.pool:
            contenders = [*contenders, max(seq.pool, key=lambda h: h.normalized).tokens]
        for other in contenders:
            n = 0
            for a, b in zip(settled, other, strict=False):
                if a != b:
                    break
                n += 1
            settled = settled[:n]
        if len(settled) <= seq.emitted_ids:
            return None
        return self._stream_event(seq, seq.text(settled), settled)

    def _final_event(self, seq: _Seq, result: SequenceResult) -> TokenEvent | None:
        """The rest of the answer, so a stream's pieces add up to the unary answer."""
        best = result.hypotheses[0]
        ids = best.token_ids[seq.emitted_ids :]
        text = ""
        if best.text.startswith(seq.emitted_text):
            text = best.text[len(seq.emitted_text) :]
        else:
            log.warning("stream of %r diverged from its final text", seq.key)
        return TokenEvent(ids, text) if ids or text else None

    def _step_beam(
        self, seq: _Seq, logits: np.ndarray, align: np.ndarray | None, moves: list[tuple[int, int]]
    ) -> list[_Hyp] | None:
        """One beam-search step of one request (the reference's walk over the 2K best
        candidates); returns its n-best when it is done."""
        p = seq.params
        k = len(seq.slots)
        slots = np.array(seq.slots, dtype=np.int64)
        vocab = logits.shape[-1]
        candidates = (seq.scores[:, None] + log_softmax(logits[slots])).reshape(-1)  # float32
        order = top_in_order(candidates, 2 * k)
        length = seq.steps + 1
        last = length == p.max_new_tokens
        want_align = p.return_alignment and align is not None
        src_len = int(self.src_len[slots[0]])
        eos = self.engine.eos_id
        live: list[tuple[int, int, np.float32, list[int], list[list[float]]]] = []
        for rank, flat in enumerate(order.tolist()):
            score = candidates[flat]
            if score == _NEG_INF:
                break
            beam, token = divmod(flat, vocab)
            tokens = [*seq.tokens[beam], token]
            aligns = seq.aligns[beam]
            if want_align and align is not None:
                aligns = [*aligns, align[slots[beam], :src_len].tolist()]
            hyp = self._beam_finish(seq, tokens, aligns if want_align else None, float(score), eos)
            if hyp is not None:
                if rank < k:
                    self._pool_add(seq.pool, hyp)
                continue
            live.append((beam, token, score, tokens, aligns))
            if len(live) == k:
                break
        seq.steps = length
        done = False
        if last:
            for _, _, score, tokens, aligns in live:
                seq.pool.append(
                    _Hyp(tokens, float(score), float(score) / len(tokens) ** p.length_penalty,
                         FinishReason.LENGTH, aligns if want_align else None)
                )  # fmt: skip
            done = True
        elif not live or len(seq.pool) >= k:
            done = True
        elif len(seq.pool) >= p.n_best:
            ranked = sorted((h.normalized for h in seq.pool), reverse=True)
            bound = max(self._best_possible(float(s), length, p) for _, _, s, _, _ in live)
            done = bound <= ranked[p.n_best - 1]
        if done:
            return self._n_best(seq)
        # Fewer than K live candidates (tiny vocabularies): pad with dead beams.
        live += [(live[0][0], live[0][1], _NEG_INF, live[0][3], live[0][4])] * (k - len(live))
        for j, (beam, token, _, _, _) in enumerate(live):
            if beam != j:
                moves.append((int(slots[j]), int(slots[beam])))
            self.next_ids[slots[j]] = token
        seq.tokens = [t for _, _, _, t, _ in live]
        seq.aligns = [a for _, _, _, _, a in live]
        seq.scores = np.array([s for _, _, s, _, _ in live], dtype=np.float32)
        return None

    def _beam_finish(
        self, seq: _Seq, tokens: list[int], aligns: list[list[float]] | None, score: float, eos: int
    ) -> _Hyp | None:
        lp = seq.params.length_penalty
        normalized = score / len(tokens) ** lp
        if tokens[-1] == eos:
            return _Hyp(
                tokens[:-1],
                score,
                normalized,
                FinishReason.EOS,
                None if aligns is None else aligns[:-1],
            )
        if seq.stop:
            text = seq.tokenizer.decode(tokens)
            at = find_stop(text, seq.stop)
            if at >= 0:
                keep = self._kept(seq.tokenizer, tokens, at)
                return _Hyp(
                    tokens[:keep], score, normalized, FinishReason.STOP,
                    None if aligns is None else aligns[:keep], text[:at],
                )  # fmt: skip
        return None

    @staticmethod
    def _pool_add(pool: list[_Hyp], hyp: _Hyp) -> None:
        """Once per token sequence, the better one kept (the reference's `_pool_add`): a
        hypothesis cut by a stop string can equal one that ended at EOS."""
        for i, other in enumerate(pool):
            if other.tokens == hyp.tokens:
                if hyp.normalized > other.normalized:
                    pool[i] = hyp
                return
        pool.append(hyp)

    @staticmethod
    def _best_possible(score: float, length: int, p: DecodingParams) -> float:
        lp = p.length_penalty
        final_length = p.max_new_tokens if lp > 0 else min(length + 1, p.max_new_tokens)
        return score / final_length**lp

    @staticmethod
    def _n_best(seq: _Seq) -> list[_Hyp]:
        best: list[_Hyp] = []
        for hyp in sorted(seq.pool, key=lambda h: h.normalized, reverse=True):
            if all(hyp.tokens != other.tokens for other in best):
                best.append(hyp)
            if len(best) == seq.params.n_best:
                break
        return best

    def _result(self, seq: _Seq, hyps: list[_Hyp]) -> SequenceResult:
        tok = seq.tokenizer
        out = []
        for h in hyps:
            out.append(
                HypothesisResult(
                    text=h.text if h.text is not None else tok.decode(h.tokens),
                    token_ids=list(h.tokens),
                    tokens=tok.pieces(h.tokens),
                    score=h.score,
                    normalized_score=h.normalized,
                    finish_reason=h.reason,
                    alignment=h.alignment if seq.params.return_alignment else None,
                )
            )
        return SequenceResult(
            model=self.engine.name,
            version=self.engine.version,
            hypotheses=out,
            input_tokens=len(seq.input_ids),
            source_tokens=tok.pieces(seq.input_ids) if seq.params.return_alignment else [],
        )


def decode_all(engine: Engine, requests: Sequence[SequenceRequest]) -> list[SequenceResult]:
    """Decode requests to completion in one batch (tests, benchmarks, offline use)."""
    items = []
    for i, request in enumerate(requests):
        ids = engine.encode(request.text)
        engine.check(request, ids)
        items.append(BatchItem(i, request, ids))
    batch = engine.new_batch()
    batch.add(items)
    results: dict[Hashable, SequenceResult] = {}
    while len(batch):
        for key, result in batch.step().finished:
            results[key] = result
    return [results[i] for i in range(len(requests))]


__all__ = [
    "AddOutput",
    "Batch",
    "BatchItem",
    "Engine",
    "EngineOptions",
    "StepOutput",
    "WarmupReport",
    "bucket",
    "choose_runtime",
    "cuda_available",
    "decode_all",
    "log_softmax",
    "sample",
    "top_in_order",
    "variant_preference",
]

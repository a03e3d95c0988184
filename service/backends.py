"""How a batch's tensors live and move: numpy arrays on the CPU, or OrtValues on a device.

`NumpyBackend` feeds numpy arrays to `session.run` and writes caches in place. The device
path, `BoundBackend`, keeps caches, logits and the decoder's new keys and values as
OrtValues on the device (IOBinding), moves rows and writes caches with tiny helper graphs
there, and on fixed buffers (`service.device.StepBuffers`) replays each decode-step shape
as a CUDA graph. The engine (service/engine.py) drives either through the same methods.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from packaging.version import Version

from export.runtime import (
    STACKED,
    bind_layers,
    cache_write_graph,
    cache_write_indices,
    layer_feeds,
    onnx_bytes,
    write_cache,
)
from service.device import DEVICE_LOCK, StepBuffers
from service.gpu import CUDA_PROVIDER

log = logging.getLogger(__name__)

CUDA = CUDA_PROVIDER
CPU = "CPUExecutionProvider"
_NP_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}
SETTLED_INPUTS = frozenset({"src_mask"})  # decoder inputs that stay the same most steps


def session_options(threads: int, device: bool = False) -> ort.SessionOptions:
    """`device`: a GPU session, whose warnings are logged (nodes left on the CPU, copies
    between devices: what keeps a graph from being captured or fast)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning threads burn the cores the asyncio loop and the other model need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 2 if device else 3
    return so


# onnxruntime before 1.31.1 may replay a CUDA graph on a host staging buffer that a run of
# another shape (a prefill, another capture) has reused since: silently wrong tokens
# (microsoft/onnxruntime#32121). 1.31.1 is the first release checked to carry the fix.
MIN_GRAPH_ORT = (1, 31, 1)


# Each CUDA graph is checked against a plain run of its step at its capture, and again at
# this run of it (a replay that reads memory its capture left behind can be right once).
RECHECK_REPLAY = 8
# How far a replayed graph's logits may be from a plain run's, by their dtype: rounding
# (a kernel may take another algorithm under capture) moves fp16 logits of 8 to 16 by
# 0.0078 a unit in the last place, and a few of those must pass; a graph replayed on stale
# memory is far off.
REPLAY_TOLERANCE = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-3}

_THREAD = threading.local()
_THREAD_NUMBERS = itertools.count(1)


def _thread_number() -> int:
    """The calling thread's number, never another thread's: a thread that ended leaves its
    threading.get_ident() to the next one started, which has none of its CUDA graphs."""
    number: int | None = getattr(_THREAD, "number", None)
    if number is None:
        number = _THREAD.number = next(_THREAD_NUMBERS)
    return number


def graphs_supported(version: str) -> bool:
    """Whether this onnxruntime version may capture CUDA graphs (MIN_GRAPH_ORT)."""
    return Version(version).release >= MIN_GRAPH_ORT


def providers_for(provider: str, device_id: int, cuda_graph: bool = False) -> list[Any]:
    if provider == CUDA:
        cuda_options = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
        if cuda_graph:
            cuda_options["enable_cuda_graph"] = "1"
        return [(CUDA, cuda_options), CPU]
    return [CPU]


def replay_matches(replayed: np.ndarray, plain: np.ndarray) -> bool:
    """Whether a CUDA graph's replayed logits equal a plain run's within REPLAY_TOLERANCE."""
    tolerance = REPLAY_TOLERANCE.get(plain.dtype, REPLAY_TOLERANCE[np.dtype(np.float32)])
    return bool(
        np.allclose(
            replayed.astype(np.float32), plain.astype(np.float32), rtol=tolerance, atol=tolerance
        )
    )


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (the reference's scores)."""
    x = x.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def log_prob_of(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row's log-probability of its token in `ids`, from float32 logits [N, V],
    computed as `log_softmax(rows)[ids]` is, without materialising the whole log-softmax."""
    top = rows.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(rows - top).sum(axis=-1))
    picked = (rows[np.arange(len(rows)), ids] - top[:, 0]) - lse
    return picked.astype(np.float32, copy=False)


def greedy_pick(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy choice per row of float32 logits [N, V] and its log-probability."""
    chosen = rows.argmax(axis=-1)  # ties to the lowest id, like torch.argmax
    return chosen, log_prob_of(rows, chosen)


# --- device backends --------------------------------------------------------------------------


def _helper_graphs(elem_type: int) -> dict[str, bytes]:
    """Row moves on device tensors [L, R, H, C, Dh] as tiny ONNX graphs."""
    from onnx import TensorProto, helper

    dims = ["L", "R", "H", "C", "D"]
    x = helper.make_tensor_value_info("x", elem_type, dims)
    u = helper.make_tensor_value_info("u", elem_type, ["L", "N", "H", "C", "D"])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["K"])
    y = helper.make_tensor_value_info("y", elem_type, None)
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [10])
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [3])

    def model(name: str, nodes: list[Any], inputs: list[Any], inits: Sequence[Any] = ()) -> bytes:
        return onnx_bytes(helper.make_graph(nodes, name, inputs, [y], initializer=list(inits)))

    return {
        "gather": model(
            "gather", [helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)], [x, idx]
        ),
        "gather_concat": model(
            "gather_concat",
            [
                helper.make_node("Concat", ["x", "u"], ["xu"], axis=1),
                helper.make_node("Gather", ["xu", "idx"], ["y"], axis=1),
            ],
            [x, u, idx],
        ),
        "pad": model("pad", [helper.make_node("Pad", ["x", "pads"], ["y"])], [x, pads]),
        "crop": model(
            "crop",
            [helper.make_node("Slice", ["x", "starts", "n", "axes"], ["y"])],
            [x, n],
            [starts, axes],
        ),
    }


def _greedy_nodes(logits: str, prefix: str) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers computing `{prefix}ids` [B] = argmax and `{prefix}picked` [B]
    = its log-probability at the last position of `logits` [B, T, V], for every row.
    The maximum is gathered at the argmax, so the chosen token's shifted logit is exactly 0
    and its log-probability is -log(sum(exp(x - max))); opset 13 or later."""
    from onnx import TensorProto, helper

    def n(name: str) -> str:
        return prefix + name

    inits = [
        helper.make_tensor(n("last"), TensorProto.INT64, [], [-1]),
        helper.make_tensor(n("axis"), TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("Gather", [logits, n("last")], [n("final")], axis=1),
        helper.make_node("Cast", [n("final")], [n("x")], to=TensorProto.FLOAT),  # [B, V]
        helper.make_node("ArgMax", [n("x")], [n("ids")], axis=-1, keepdims=0),
        helper.make_node("Unsqueeze", [n("ids"), n("axis")], [n("ids2")]),  # [B, 1]
        helper.make_node("GatherElements", [n("x"), n("ids2")], [n("top")], axis=1),
        helper.make_node("Sub", [n("x"), n("top")], [n("shifted")]),
        helper.make_node("Exp", [n("shifted")], [n("e")]),
        helper.make_node("ReduceSum", [n("e"), n("axis")], [n("total")], keepdims=1),
        helper.make_node("Log", [n("total")], [n("lse")]),
        helper.make_node("Neg", [n("lse")], [n("picked2")]),
        helper.make_node("Squeeze", [n("picked2"), n("axis")], [n("picked")]),  # [B]
    ]
    return nodes, inits


def greedy_graph(elem_type: int) -> bytes:
    """ids, picked = argmax and its log-probability at the last position of logits
    [B, T, V], every row, on the device: only 2B numbers leave it per step instead of the
    whole [B, V] logits (at batch 64 and a 32k vocabulary, 4 MB plus a host-side
    log-softmax over them every step)."""
    from onnx import TensorProto, helper

    nodes, inits = _greedy_nodes("logits", "")
    graph = helper.make_graph(
        nodes,
        "greedy",
        [helper.make_tensor_value_info("logits", elem_type, ["B", "T", "V"])],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"]),
            helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["B"]),
        ],
        initializer=inits,
    )
    return onnx_bytes(graph)


GREEDY_PREFIX = "greedy_"


def decoder_with_greedy(path: Path) -> bytes:
    """The decoder graph with the greedy reduction appended (outputs greedy_ids and
    greedy_picked): on the device path a step's greedy rows then come out of the same
    run, and of the same CUDA graph, instead of a helper run of their own."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError(f"{path}: opset {opset}; the greedy nodes need 13 or later")
    names = {v for node in model.graph.node for v in (*node.input, *node.output)}
    names |= {i.name for i in model.graph.initializer}
    if any(name.startswith(GREEDY_PREFIX) for name in names):
        raise ValueError(f"{path} already has names starting with {GREEDY_PREFIX!r}")
    nodes, inits = _greedy_nodes("logits", GREEDY_PREFIX)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.output.extend(
        [
            helper.make_tensor_value_info(GREEDY_PREFIX + "ids", TensorProto.INT64, ["B"]),
            helper.make_tensor_value_info(GREEDY_PREFIX + "picked", TensorProto.FLOAT, ["B"]),
        ]
    )
    return bytes(model.SerializeToString())


class _Timed:
    """Every session run of a backend goes through `_run`/`_run_bound`, which add its time
    to `run_seconds`: a step's time minus its runs' is the host's own work (bookkeeping,
    copies, Python), the share CUDA graphs cannot remove. Counted per thread: on the CPU a
    batch's newcomers are encoded in another thread while it steps
    (`Engine.overlaps_admission`), and those runs are not the step's."""

    def __init__(self) -> None:
        self._runs = threading.local()

    @property
    def run_seconds(self) -> float:
        """Seconds the calling thread has spent in this backend's session runs."""
        return float(getattr(self._runs, "seconds", 0.0))

    def _ran(self, start: float) -> None:
        self._runs.seconds = self.run_seconds + time.perf_counter() - start

    def _run(self, session: Any, names: list[str], feeds: dict[str, Any]) -> list[Any]:
        start = time.perf_counter()
        try:
            return list(session.run(names, feeds))
        finally:
            self._ran(start)

    def _run_bound(self, session: Any, io: Any, options: ort.RunOptions | None = None) -> None:
        start = time.perf_counter()
        try:
            session.run_with_iobinding(io, options)
        finally:
            self._ran(start)


class NumpyBackend(_Timed):
    """CPU: caches are numpy arrays; moves happen in place."""

    def __init__(
        self, decoder: ort.InferenceSession, encoder: ort.InferenceSession | None, dtype: type
    ) -> None:
        super().__init__()
        self.decoder_session = decoder
        self.encoder_session = encoder
        self.dtype = dtype
        self.alignment = any(o.name == "cross_attention" for o in decoder.get_outputs())

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=self.dtype)

    def close(self) -> None:
        """Nothing to do: host memory may be freed at any time."""

    def new_buffers(self, owner: object) -> StepBuffers | None:
        return None  # numpy caches are written in place; any address will do

    def pin(self, x: Any, role: str, buffers: StepBuffers | None) -> Any:
        return x

    def decode(
        self, feeds: dict[str, Any], want_alignment: bool, buffers: StepBuffers | None = None
    ) -> tuple[np.ndarray, Any, Any, np.ndarray | None]:
        names = ["logits", "new_k", "new_v"]
        if want_alignment and self.alignment:
            names.append("cross_attention")
        out = self._run(self.decoder_session, names, layer_feeds(feeds))
        return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)

    def write_kv(
        self,
        past_k: Any,
        past_v: Any,
        new_k: Any,
        new_v: Any,
        positions: np.ndarray,
        buffers: StepBuffers | None = None,
    ) -> tuple[Any, Any]:
        """The step's new keys and values into the caches (in place here)."""
        return write_cache(past_k, new_k, positions), write_cache(past_v, new_v, positions)

    def greedy(
        self,
        logits: Any,
        rows: np.ndarray,
        buffers: StepBuffers | None = None,
        scored: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's greedy token and its log-probability; `scored` (a mask over `rows`,
        None: all) says which log-probabilities are wanted, the others read 0: the
        log-softmax behind them is most of this reduction's cost (32 rows of a vocabulary
        of 8,000 on this project's CPU: 0.35 ms, the argmax alone 0.02)."""
        host = logits[rows, -1, :].astype(np.float32, copy=False)
        if scored is None or scored.all():
            return greedy_pick(host)
        chosen = host.argmax(axis=-1)
        picked = np.zeros(len(rows), dtype=np.float32)
        if scored.any():
            picked[scored] = log_prob_of(host[scored], chosen[scored])
        return chosen, picked

    def host_logits(self, logits: Any) -> np.ndarray:
        """The last position's logits of every row, float32 [B, V], on the host."""
        return np.asarray(logits[:, -1, :], dtype=np.float32)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[Any, Any]:
        assert self.encoder_session is not None
        ck, cv = self._run(
            self.encoder_session, ["cross_k", "cross_v"], {"src_ids": src_ids, "src_mask": src_mask}
        )
        return ck, cv

    def gather(self, x: Any, perm: np.ndarray) -> Any:
        return np.ascontiguousarray(np.take(x, perm, axis=1))

    def assign(self, x: Any, dst: np.ndarray, u: Any, src: np.ndarray) -> Any:
        x[:, dst] = u[:, src]
        return x

    def move(self, x: Any, dst: np.ndarray, src: np.ndarray) -> Any:
        x[:, dst] = x[:, src]  # the fancy-indexed right side is a copy: no aliasing
        return x

    def resize(self, x: Any, length: int) -> Any:
        shape = list(x.shape)
        if shape[3] == length:
            return x
        keep = min(shape[3], length)
        shape[3] = length
        out = np.zeros(shape, dtype=x.dtype)
        out[:, :, :, :keep] = x[:, :, :, :keep]
        return out

    def host(self, x: Any) -> np.ndarray:
        return np.asarray(x)


class BoundBackend(_Timed):
    """Device path: caches are OrtValues on `device`; the decoder's new keys and values
    stay there, and cache writes and row moves run as helper graphs on the device.

    With `static` (EngineOptions.cuda_graphs), a batch steps on fixed buffers per shape
    (`StepBuffers`), each step shape bound once; with `capture` (CUDA) each step shape
    replays as a CUDA graph captured at its first step. Every device call holds
    DEVICE_LOCK shared on CUDA, a capture holds it alone (service/device.py says why)."""

    def __init__(
        self,
        decoder: ort.InferenceSession,
        encoder: ort.InferenceSession | None,
        dtype: type,
        provider: str,
        device_id: int,
        threads: int,
        vocab_size: int,
        static: bool = False,
        capture: bool = False,
        plain_decoder: Callable[[], ort.InferenceSession] | None = None,
    ) -> None:
        super().__init__()
        self.decoder_session = decoder
        self.encoder_session = encoder
        self.dtype = dtype
        self.device = "cuda" if provider == CUDA else "cpu"
        self.device_id = device_id if provider == CUDA else 0
        self.alignment = any(o.name == "cross_attention" for o in decoder.get_outputs())
        self.output_dtypes = {o.name: _NP_TYPES[o.type] for o in decoder.get_outputs()}
        self.fused_greedy = GREEDY_PREFIX + "ids" in self.output_dtypes  # decoder_with_greedy
        self.vocab_size = vocab_size
        self.static = static
        self.capture = capture
        self._graph_session = capture  # the decoder session was made with graph capture on
        self._plain_decoder = plain_decoder
        # (thread, buffers, rows, cache, source) -> gpu_graph_id. onnxruntime keeps a
        # session's captured graphs per thread: another thread would capture anew.
        self._graph_ids: dict[tuple[int, int, int, int, int], int] = {}
        self._buffers: weakref.WeakSet[StepBuffers] = weakref.WeakSet()  # for close()
        self._idle: list[StepBuffers] = []  # of batches gone, for new_buffers
        self._options: dict[int, ort.RunOptions] = {}
        self._replays: dict[int, int] = {}  # gpu_graph_id -> replays since its capture
        self.verified_graphs = 0  # checks of a graph's replay against a plain run
        from onnx import TensorProto

        elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
        so = session_options(threads, device=provider == CUDA)
        graphs = {
            **_helper_graphs(elem),
            "write_kv": cache_write_graph(elem, ("_k", "_v")),
            "greedy": greedy_graph(elem),
        }
        self._grids: dict[tuple[tuple[int, ...], int], np.ndarray] = {}
        # Held by the backend as they are made: should one fail, those made go with it,
        # when the engine frees it under the lock (Engine._drop_partial), not as this unwinds.
        self.helpers: dict[str, ort.InferenceSession] = {}
        with self._shared():
            for name, blob in graphs.items():
                self.helpers[name] = ort.InferenceSession(
                    blob, so, providers=providers_for(provider, device_id)
                )

    def _shared(self) -> AbstractContextManager[None]:
        return DEVICE_LOCK.shared() if self.device == "cuda" else nullcontext()

    def _alone(self) -> AbstractContextManager[None]:
        """For what frees device memory (a session going) or captures: a synchronizing
        CUDA call from another thread during a capture breaks that capture."""
        return DEVICE_LOCK.exclusive() if self.device == "cuda" else nullcontext()

    def close(self) -> None:
        """Free the sessions and the batches' device buffers now, under the lock held
        alone. Left to the garbage collector, they would go at any time, on any thread,
        perhaps during another model's capture (a version retiring while the new one
        captures its first steps). The backend cannot step afterwards."""
        with self._alone():
            for buffers in list(self._buffers):
                buffers.clear()
            self._idle.clear()
            self.helpers = {}
            self._options.clear()
            self._plain_decoder = None  # it refers to the engine: a cycle otherwise
            del self.decoder_session, self.encoder_session
            gc.collect()  # anything else that held them, while the lock is held

    def _value(self, array: np.ndarray) -> Any:
        with self._shared():
            return ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self._value(np.zeros(shape, dtype=self.dtype))

    def _bind_inputs(self, io: Any, feeds: dict[str, Any]) -> None:
        """Bind feeds; the caller holds the device lock: onnxruntime copies a host array
        to the device as it is bound, not when the session runs."""
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, value)

    # --- fixed buffers (CUDA graphs) -----------------------------------------------------

    def new_buffers(self, owner: object) -> StepBuffers | None:
        """Fixed buffers for `owner` (a batch), back here for the next batch when it goes.
        A batch gone (the scheduler makes a fresh one after a failed step) leaves its
        graphs in the capture session, which frees none before it goes: fresh buffers would
        have each step shape captured anew, a graph more each time, while these replay."""
        if not self.static:
            return None
        buffers = self._idle.pop() if self._idle else StepBuffers()
        self._buffers.add(buffers)
        weakref.finalize(owner, self._idle.append, buffers)
        return buffers

    def pin(self, x: Any, role: str, buffers: StepBuffers | None) -> Any:
        """`x` in the batch's fixed buffer for its role and shape (copied there if it is
        not already it: after a relayout, a resize or an admission)."""
        if buffers is None:
            return x
        shape = tuple(x.shape())
        fixed = buffers.get(role, shape)
        if fixed is None:
            fixed = buffers.put(role, self.zeros(shape))
        if x is not fixed:
            identity = np.arange(shape[1], dtype=np.int64)
            self._helper("gather", {"x": x, "idx": identity}, out=fixed)
        return fixed

    def _small(self, buffers: StepBuffers, name: str, array: np.ndarray) -> Any:
        """A per-step host input copied into its fixed buffer. Ids and positions change
        every step; the source mask changes only when rows come or go, so it is copied
        only then (each copy to a GPU is a synchronous transfer)."""
        key = (name, array.shape)
        fixed = buffers.get(name, array.shape)
        if fixed is None:  # a copy: on the CPU an OrtValue wraps the array it is made from
            fixed = buffers.put(name, self._value(np.array(array, copy=True, order="C")))
        elif name not in SETTLED_INPUTS or not np.array_equal(buffers.uploaded[key], array):
            with self._shared():
                fixed.update_inplace(np.ascontiguousarray(array))
        else:
            return fixed
        if name in SETTLED_INPUTS:
            buffers.uploaded[key] = array.copy()
        return fixed

    def _output(self, buffers: StepBuffers, name: str, shape: tuple[int, ...]) -> Any:
        fixed = buffers.get(name, shape)
        if fixed is None:
            fixed = buffers.put(name, self._value(np.zeros(shape, self.output_dtypes[name])))
        return fixed

    def _step_binding(
        self, feeds: dict[str, Any], buffers: StepBuffers
    ) -> tuple[tuple[int, int, int], Any, dict[str, Any]]:
        """The step's IOBinding and outputs on fixed buffers (made once per step shape);
        the small inputs copied in. The caches in `feeds` must be the pinned ones."""
        rows, cache = feeds["past_k"].shape()[1], feeds["past_k"].shape()[3]
        source = feeds["cross_k"].shape()[3] if "cross_k" in feeds else 0
        key = (rows, cache, source)
        for role in STACKED:
            if role in feeds and feeds[role] is not buffers.get(role, feeds[role].shape()):
                raise ValueError(f"{role} is not the batch's fixed buffer: pin() it first")
        small = {k: self._small(buffers, k, v) for k, v in feeds.items() if k not in STACKED}
        session, io, outputs = buffers.bindings.get(key, (None, None, {}))
        if session is not self.decoder_session:  # first step of this shape, or a new session
            L, _, H, _, D = feeds["past_k"].shape()
            outputs = {
                "logits": self._output(buffers, "logits", (rows, 1, self.vocab_size)),
                "new_k": self._output(buffers, "new_k", (L, rows, H, 1, D)),
                "new_v": self._output(buffers, "new_v", (L, rows, H, 1, D)),
            }
            if self.alignment:
                outputs["cross_attention"] = self._output(
                    buffers, "cross_attention", (rows, 1, source)
                )
            if self.fused_greedy:
                for name in (GREEDY_PREFIX + "ids", GREEDY_PREFIX + "picked"):
                    outputs[name] = self._output(buffers, name, (rows,))
            io = self.decoder_session.io_binding()
            with self._shared():
                for name, value in small.items():
                    io.bind_ortvalue_input(name, value)
                bind_layers(io, feeds, self.device, self.device_id)
                for name, value in outputs.items():
                    io.bind_ortvalue_output(name, value)
            buffers.bindings[key] = (self.decoder_session, io, outputs)
        return key, io, outputs

    def _run_options(self, graph_id: int) -> ort.RunOptions:
        options = self._options.get(graph_id)
        if options is None:  # made once per graph id (the step's host work is the cost)
            options = self._options[graph_id] = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def _decode_static(
        self, feeds: dict[str, Any], want_alignment: bool, buffers: StepBuffers
    ) -> tuple[Any, Any, Any, np.ndarray | None]:
        key, io, out = self._step_binding(feeds, buffers)
        if not self.capture:
            with self._shared():
                self._run_bound(self.decoder_session, io, self._plain_options())
        else:
            graph = (_thread_number(), buffers.id, *key)
            known = graph in self._graph_ids
            if not known:
                self._graph_ids[graph] = len(self._graph_ids) + 1
            graph_id = self._graph_ids[graph]
            options = self._run_options(graph_id)
            try:
                # The first run of a graph id runs the step and captures it; later ones
                # replay it on the same buffers.
                with DEVICE_LOCK.shared() if known else DEVICE_LOCK.exclusive():
                    self._run_bound(self.decoder_session, io, options)
                replays = self._replays[graph_id] = self._replays.get(graph_id, 0) + 1
                good = (known and replays != RECHECK_REPLAY) or self._verify(
                    io, options, out["logits"]
                )
            except Exception:
                log.exception("CUDA graph capture or replay failed: decoding without graphs")
                good = False
            if not good:
                io = None  # bound to the capture session, which goes now
                reached = list(dict.fromkeys((r, c, s) for _, _, r, c, s in self._graph_ids))
                if self._stop_capture():
                    self._warm(feeds, reached)
                _, io, out = self._step_binding(feeds, buffers)
                with self._shared():
                    self._run_bound(self.decoder_session, io, self._plain_options())
        if self.fused_greedy:  # this step's greedy rows, for greedy() to read
            buffers.greedy = (
                out["logits"],
                out[GREEDY_PREFIX + "ids"],
                out[GREEDY_PREFIX + "picked"],
            )
        align = None
        if want_alignment and self.alignment:
            with self._shared():
                align = out["cross_attention"].numpy()
        return out["logits"], out["new_k"], out["new_v"], align

    def _verify(self, io: Any, replay: ort.RunOptions, logits: Any) -> bool:
        """Whether a new graph's replayed logits equal a plain run's of the same bound
        step (two runs, at the graph's capture and again at its RECHECK_REPLAY-th run). On
        a mismatch (logged) the caller turns capture off, so a graph never serves tokens a
        plain run would not."""
        with self._shared():
            self._run_bound(self.decoder_session, io, replay)
            replayed = logits.numpy().copy()  # on the CPU a view, which the next run writes
            self._run_bound(self.decoder_session, io, self._plain_options())
            plain = logits.numpy()
        self.verified_graphs += 1
        if replay_matches(replayed, plain):
            return True
        worst = float(np.max(np.abs(replayed.astype(np.float32) - plain))) if plain.size else 0.0
        log.error(
            "a CUDA graph replay differs from a plain run (max |diff| %.3g): "
            "decoding without graphs", worst,
        )  # fmt: skip
        return False

    def _plain_options(self) -> ort.RunOptions | None:
        """A run without a graph: a session with capture on needs to be told (id -1)."""
        return self._run_options(-1) if self._graph_session else None

    def _stop_capture(self) -> bool:
        """Plain runs from now on, on a decoder session made without graph capture (a
        session with it would still try to capture runs without a graph id). The capture
        session goes, with every step binding made on it, under the lock held alone.
        Returns whether a new session was made (it has run no shape yet)."""
        self.capture = False
        self._graph_ids.clear()
        self._replays.clear()
        if self._plain_decoder is None:
            return False
        with self._alone():
            self.decoder_session = self._plain_decoder()
            self._graph_session = False
            for buffers in list(self._buffers):
                buffers.bindings.clear()
            gc.collect()
        return True

    def _warm(self, feeds: dict[str, Any], shapes: Sequence[tuple[int, int, int]]) -> None:
        """Run each step shape (rows, cache, source) once on zeros laid out as `feeds`: the
        decoder session made at a fallback has run none (warm-up ran the capture session),
        and the shapes the batches had reached would each make a step slow at its first
        plain run (kernel choice, allocations). A plain session beside the capture one from
        the start would cost its memory and a second warm-up on every load instead."""
        layers, _, heads, _, dim = feeds["past_k"].shape()
        for rows, cache, source in shapes:
            width = source if "cross_k" in feeds else None
            zeros = zero_step(self, (layers, heads, dim), rows, cache, width)
            self.decode(zeros, want_alignment=False)

    # --- the step ------------------------------------------------------------------------

    def decode(
        self, feeds: dict[str, Any], want_alignment: bool, buffers: StepBuffers | None = None
    ) -> tuple[Any, Any, Any, np.ndarray | None]:
        if buffers is not None and feeds["input_ids"].shape[1] == 1:
            return self._decode_static(feeds, want_alignment, buffers)
        # A prefill (or any step off the fixed buffers): outputs in the session's own
        # arena, which captured graphs reuse for their intermediates. The caller copies
        # them into its caches before a replay could overwrite them.
        io = self.decoder_session.io_binding()
        with self._shared():
            self._bind_inputs(io, {k: v for k, v in feeds.items() if k not in STACKED})
            bind_layers(io, feeds, self.device, self.device_id)
            io.bind_output("logits", self.device, self.device_id)
            io.bind_output("new_k", self.device, self.device_id)
            io.bind_output("new_v", self.device, self.device_id)
            if self.alignment:
                io.bind_output("cross_attention", self.device, self.device_id)
            self._run_bound(self.decoder_session, io, self._plain_options())
            outputs = io.get_outputs()
            align = outputs[3].numpy() if self.alignment and want_alignment else None
        return outputs[0], outputs[1], outputs[2], align

    def _bound_helper(
        self,
        name: str,
        shape: tuple[int, ...],
        tensors: tuple[Any, ...],
        buffers: StepBuffers | None,
    ) -> tuple[Any, bool]:
        """A helper's IOBinding: made afresh, or (fixed buffers) the one made for these
        same `tensors` at this shape. Returns it and whether it must be bound."""
        session = self.helpers[name]
        if buffers is None:
            return session.io_binding(), True
        made = buffers.helper_bindings.get((name, shape))
        if made is not None and all(a is b for a, b in zip(made[0], tensors, strict=True)):
            return made[1], False
        io = session.io_binding()
        buffers.helper_bindings[(name, shape)] = (tensors, io)
        return io, True

    def write_kv(
        self,
        past_k: Any,
        past_v: Any,
        new_k: Any,
        new_v: Any,
        positions: np.ndarray,
        buffers: StepBuffers | None = None,
    ) -> tuple[Any, Any]:
        """Both caches written in place by one helper run on the device (ScatterND's
        output bound to its input: onnxruntime skips the copy), sharing one index tensor."""
        shape, steps = tuple(past_k.shape()), new_k.shape()[3]
        grid = self._grids.get((shape, steps))
        if grid is None:  # per shape bucket: the [L, B, H, T] grid with slots 0..T-1
            grid = cache_write_indices(shape, np.zeros(shape[1], dtype=np.int64), steps)
            self._grids[(shape, steps)] = grid
        idx = grid.copy()
        idx[..., 3] += positions[None, :, None, None]
        io, fresh = self._bound_helper("write_kv", shape, (past_k, past_v, new_k, new_v), buffers)
        with self._shared():
            if fresh:
                self._bind_inputs(
                    io, {"cache_k": past_k, "cache_v": past_v, "new_k": new_k, "new_v": new_v}
                )
                io.bind_ortvalue_output("y_k", past_k)
                io.bind_ortvalue_output("y_v", past_v)
            io.bind_cpu_input("idx", idx)
            self._run_bound(self.helpers["write_kv"], io)
        return past_k, past_v

    def greedy(
        self,
        logits: Any,
        rows: np.ndarray,
        buffers: StepBuffers | None = None,
        scored: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Reduced over every row of the batch (a bucket): one shape per bucket, warmed up
        # with the decoder; the rows asked for are picked on the host. Every row's
        # log-probability comes with it (`scored` saves nothing on the device).
        if buffers is not None and buffers.greedy is not None and buffers.greedy[0] is logits:
            _, ids_value, picked_value = buffers.greedy  # reduced by this step's decoder run
            buffers.greedy = None
            with self._shared():
                return ids_value.numpy()[rows], picked_value.numpy()[rows]
        session = self.helpers["greedy"]
        io, fresh = self._bound_helper("greedy", tuple(logits.shape()), (logits,), buffers)
        with self._shared():
            if fresh:
                io.bind_ortvalue_input("logits", logits)
                io.bind_output("ids", "cpu")
                io.bind_output("picked", "cpu")
            self._run_bound(session, io)
            ids, picked = io.get_outputs()
            return ids.numpy()[rows], picked.numpy()[rows]

    def host_logits(self, logits: Any) -> np.ndarray:
        """The last position's logits of every row, float32 [B, V], on the host (only
        when a row samples or searches beams)."""
        with self._shared():
            return np.asarray(logits.numpy()[:, -1, :], dtype=np.float32)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[Any, Any]:
        assert self.encoder_session is not None
        io = self.encoder_session.io_binding()
        with self._shared():
            io.bind_cpu_input("src_ids", src_ids)
            io.bind_cpu_input("src_mask", src_mask)
            io.bind_output("cross_k", self.device, self.device_id)
            io.bind_output("cross_v", self.device, self.device_id)
            self._run_bound(self.encoder_session, io)
            out = io.get_outputs()
        return out[0], out[1]

    def _helper(self, name: str, feeds: dict[str, Any], out: Any = None) -> Any:
        session = self.helpers[name]
        io = session.io_binding()
        with self._shared():
            self._bind_inputs(io, feeds)
            if out is None:
                io.bind_output("y", self.device, self.device_id)
            else:
                io.bind_ortvalue_output("y", out)
            self._run_bound(session, io)
            return io.get_outputs()[0]

    def gather(self, x: Any, perm: np.ndarray) -> Any:
        return self._helper("gather", {"x": x, "idx": perm.astype(np.int64)})

    def assign(self, x: Any, dst: np.ndarray, u: Any, src: np.ndarray) -> Any:
        perm = np.arange(x.shape()[1], dtype=np.int64)
        perm[dst] = x.shape()[1] + src
        return self._helper("gather_concat", {"x": x, "u": u, "idx": perm})

    def move(self, x: Any, dst: np.ndarray, src: np.ndarray) -> Any:
        perm = np.arange(x.shape()[1], dtype=np.int64)
        perm[dst] = src
        return self.gather(x, perm)

    def resize(self, x: Any, length: int) -> Any:
        current = x.shape()[3]
        if current == length:
            return x
        if length < current:
            return self._helper("crop", {"x": x, "n": np.array([length], dtype=np.int64)})
        pads = np.zeros(10, dtype=np.int64)
        pads[5 + 3] = length - current
        return self._helper("pad", {"x": x, "pads": pads})

    def host(self, x: Any) -> np.ndarray:
        with self._shared():
            return np.asarray(x.numpy())


Backend = NumpyBackend | BoundBackend


def zero_step(
    backend: Backend,
    cache_shape: tuple[int, int, int],
    rows: int,
    cache: int,
    source: int | None,
    tokens: int = 1,
    pad_id: int = 0,
) -> dict[str, Any]:
    """A decoder call's inputs at one shape, all zeros (ids pad_id): what warming a shape
    runs. cache_shape: layers, heads, head_dim; source None for a decoder-only model."""
    layers, heads, dim = cache_shape
    feeds: dict[str, Any] = {
        "input_ids": np.full((rows, tokens), pad_id, dtype=np.int64),
        "positions": np.zeros(rows, dtype=np.int64),
        "past_k": backend.zeros((layers, rows, heads, cache, dim)),
        "past_v": backend.zeros((layers, rows, heads, cache, dim)),
    }
    if source is not None:
        feeds["cross_k"] = backend.zeros((layers, rows, heads, source, dim))
        feeds["cross_v"] = backend.zeros((layers, rows, heads, source, dim))
        feeds["src_mask"] = np.ones((rows, source), dtype=bool)
    return feeds

"""The CPU and device backends (service/backends.py): the device path's helper graphs equal
numpy, the fixed buffers CUDA graphs replay on keep their addresses, and a graph that
fails its check or its capture falls back to plain runs with the same answers."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.manifest import load_manifest
from service.backends import (
    CUDA,
    RECHECK_REPLAY,
    BoundBackend,
    decoder_with_greedy,
    graphs_supported,
    greedy_graph,
    greedy_pick,
    providers_for,
    replay_matches,
)
from service.domain import SequenceResult
from service.engine import Batch, BatchItem, Engine
from tests.service._decoding import (
    JOIN_AT,
    PATHS,
    TEXTS,
    assert_same,
    engine_for,
    make_engine,
    reference,
    request,
    run_staggered,
)
from tests.service._engine_models import LM, PROMPTS, SOURCES, TRANSLATOR, model_repository
from transformer.decoding import DecodingOptions

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("exported_models")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_greedy_head_equals_log_softmax_argmax(dtype: type) -> None:
    """The greedy reduction (numpy on the CPU path, an ONNX graph where the logits stay on
    the device) picks torch.argmax's token, lowest id on ties, with its log-probability."""
    from onnx import TensorProto

    rng = np.random.default_rng(1)
    logits: np.ndarray = (rng.normal(size=(6, 1, 50)) * 4).astype(dtype)
    logits[2, 0, [7, 31]] = logits[2, 0].max() + 1  # a tie: the lower id wins
    rows = np.array([5, 2, 0])
    last = logits[rows, -1, :].astype(np.float32)
    want_ids = torch.from_numpy(last).argmax(dim=-1).numpy()
    want_lp = torch.log_softmax(torch.from_numpy(last), dim=-1).numpy()[np.arange(3), want_ids]
    assert want_ids[1] == 7

    ids, picked = greedy_pick(last)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(picked, want_lp, atol=1e-5)

    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    session = ort.InferenceSession(greedy_graph(elem), providers=["CPUExecutionProvider"])
    ids, picked = (out[rows] for out in session.run(None, {"logits": logits}))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(picked, want_lp, atol=1e-5)
    assert picked.dtype == np.float32


def test_greedy_sums_log_probabilities_only_for_the_rows_that_want_them() -> None:
    """Rows whose request asked for no scores get the same tokens and read 0; the others'
    log-probabilities are what the full reduction gives."""
    backend = engine_for(TRANSLATOR).backend
    logits = np.random.default_rng(4).normal(size=(5, 1, 96)).astype(np.float32)
    rows = np.array([4, 0, 2, 1])
    all_ids, all_picked = backend.greedy(logits, rows)
    for scored in ([True, False, True, False], [False] * 4, [True] * 4):
        mask = np.array(scored)
        ids, picked = backend.greedy(logits, rows, scored=mask)
        np.testing.assert_array_equal(ids, all_ids)
        np.testing.assert_allclose(picked[mask], all_picked[mask], atol=1e-6)
        assert not picked[~mask].any()
    assert (all_picked < 0).all()


def test_device_greedy_and_host_logits_equal_numpy() -> None:
    """The device path's greedy reduction and host copy of logits left as an OrtValue
    give what the numpy path gives from the array."""
    engine = engine_for(TRANSLATOR, "iobinding")
    bound, plain = engine.backend, engine_for(TRANSLATOR).backend
    logits = np.random.default_rng(2).normal(size=(4, 1, 96)).astype(np.float32)
    value = bound._value(logits)  # type: ignore[union-attr]
    rows = np.array([3, 1])
    ids, picked = bound.greedy(value, rows)
    want_ids, want_picked = plain.greedy(logits, rows)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(picked, want_picked, atol=1e-6)
    np.testing.assert_array_equal(bound.host_logits(value), logits[:, -1, :])


def test_device_cache_write_equals_numpy() -> None:
    """Keys and values written in place by one device helper run, its index grid reused
    across steps of a shape, land where numpy's in-place write puts them."""
    bound = engine_for(LM, "iobinding").backend
    plain = engine_for(LM).backend
    assert isinstance(bound, BoundBackend)
    rng = np.random.default_rng(3)
    k, v = (rng.normal(size=(2, 3, 2, 8, 4)).astype(np.float32) for _ in range(2))
    dk, dv = bound._value(k.copy()), bound._value(v.copy())
    for positions in (np.array([0, 5, 2]), np.array([1, 6, 3]), np.array([4, 4, 0])):
        new_k, new_v = (rng.normal(size=(2, 3, 2, 1, 4)).astype(np.float32) for _ in range(2))
        k, v = plain.write_kv(k, v, new_k, new_v, positions)
        before = dk.data_ptr(), dv.data_ptr()
        written = bound.write_kv(dk, dv, bound._value(new_k), bound._value(new_v), positions)
        assert written == (dk, dv) and (dk.data_ptr(), dv.data_ptr()) == before  # in place
        np.testing.assert_array_equal(bound.host(dk), k)
        np.testing.assert_array_equal(bound.host(dv), v)


def test_device_row_moves_equal_numpy() -> None:
    """The helper graphs the device path uses for row moves do what numpy does."""
    bound = engine_for(LM, "iobinding").backend
    plain = engine_for(LM).backend
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 3, 8, 5)).astype(np.float32)
    u = rng.normal(size=(2, 3, 3, 8, 5)).astype(np.float32)
    dst, src = np.array([3, 0]), np.array([2, 0])
    perm = np.array([1, 1, 0, 3, 2])

    def both(op: str, *args: object) -> None:
        def host(backend: object, value: np.ndarray) -> object:
            return value.copy() if backend is plain else bound._value(value.copy())  # type: ignore[union-attr]

        converted_plain = [
            host(plain, a) if isinstance(a, np.ndarray) and a.ndim == 5 else a for a in args
        ]
        converted_bound = [
            host(bound, a) if isinstance(a, np.ndarray) and a.ndim == 5 else a for a in args
        ]
        want = plain.host(getattr(plain, op)(*converted_plain))
        got = bound.host(getattr(bound, op)(*converted_bound))
        np.testing.assert_array_equal(got, want)

    both("gather", x, perm)
    both("assign", x, dst, u, src)
    both("move", x, dst, src)
    both("resize", x, 16)
    both("resize", x, 3)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_step_reports_its_time_inside_onnxruntime(path: str) -> None:
    """run_seconds: the part of a step spent in session runs (the rest is host work);
    admissions' encoder runs belong to add(), not to the step, and another thread's runs
    (newcomers encoded while a batch steps) to that thread."""
    engine = engine_for(TRANSLATOR, path)
    batch = engine.new_batch()
    item = BatchItem(
        0, request(TRANSLATOR, SOURCES[0], max_new_tokens=5), engine.encode(SOURCES[0])
    )
    batch.add([item])
    before = engine.backend.run_seconds
    out = batch.step()
    assert 0 < out.run_seconds < out.seconds
    assert engine.backend.run_seconds - before == pytest.approx(out.run_seconds)
    assert batch.step().run_seconds > 0 and engine.new_batch().step().run_seconds == 0.0
    mine = engine.backend.run_seconds
    with ThreadPoolExecutor(1) as other:
        theirs = other.submit(lambda: (engine.prepare([item]), engine.backend.run_seconds))
        assert theirs.result()[1] > 0
    assert engine.backend.run_seconds == mine


def test_fixed_buffers_keep_their_addresses_for_each_step_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a CUDA graph replays on: every step of a shape binds the same device buffers
    (caches written in place, admissions and relayouts copied into them), one binding per
    step shape (the cache write's too; greedy rows come out of the decoder run itself), and
    the outputs equal the reference."""
    engine = make_engine(TRANSLATOR, **PATHS["fixed"])
    bound = engine.backend
    assert isinstance(bound, BoundBackend) and bound.static and not bound.capture
    made: list[str] = []

    def counted(name: str, session: ort.InferenceSession) -> Callable[[], object]:
        real = session.io_binding

        def io_binding() -> object:
            made.append(name)
            return real()

        return io_binding

    for name in ("write_kv", "greedy"):
        session = bound.helpers[name]
        monkeypatch.setattr(session, "io_binding", counted(name, session))
    batch = engine.new_batch()
    buffers = batch.buffers
    assert buffers is not None
    texts = SOURCES[:5]
    reqs = [request(TRANSLATOR, t, max_new_tokens=60) for t in texts]
    addresses: dict[tuple[str, tuple[int, ...]], set[int]] = {}
    results: dict[Hashable, SequenceResult] = {}
    step = 0
    while len(results) < len(reqs):
        joining = [
            BatchItem(i, reqs[i], engine.encode(texts[i]))
            for i in ([0] if step == 0 else [1, 2, 3, 4] if step == 3 else [])
        ]
        batch.add(joining)
        results.update(batch.step().finished)
        for role in ("past_k", "past_v", "cross_k", "cross_v"):
            value = getattr(batch, role)
            if len(batch):
                assert value is buffers.get(role, value.shape())
                assert value is not None
                addresses.setdefault((role, tuple(value.shape())), set()).add(value.data_ptr())
        step += 1
    assert len({shape for _, shape in addresses}) >= 3  # rows, cache and source changed
    assert all(len(ptrs) == 1 for ptrs in addresses.values()), addresses
    assert len(buffers.bindings) >= 3
    assert step > 2 * len(buffers.bindings)
    assert made.count("write_kv") == len({(r, c) for r, c, _ in buffers.bindings})  # per cache
    assert bound.fused_greedy and "greedy" not in made  # the decoder run reduced them
    expected = reference(TRANSLATOR, texts, DecodingOptions(max_new_tokens=60))
    for i, exp in enumerate(expected):
        assert_same(results[i], exp)


def test_only_a_cuda_decoder_session_asks_for_graph_capture() -> None:
    """enable_cuda_graph goes to the CUDA provider of the decoder made for capture and
    nowhere else; the device path without graphs keeps no fixed buffers."""
    cuda = providers_for(CUDA, 1, cuda_graph=True)
    assert cuda[0] == (
        CUDA,
        {"device_id": 1, "arena_extend_strategy": "kSameAsRequested", "enable_cuda_graph": "1"},
    )
    assert "enable_cuda_graph" not in providers_for(CUDA, 1)[0][1]
    assert providers_for("CPUExecutionProvider", 0, cuda_graph=True) == ["CPUExecutionProvider"]
    assert engine_for(TRANSLATOR, "iobinding").new_batch().buffers is None
    assert engine_for(TRANSLATOR).new_batch().buffers is None


def test_without_the_fused_greedy_graph_greedy_rows_use_the_helper(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The greedy nodes go into a decoder once: a graph that has them is refused, and an
    engine whose decoder cannot take them reduces greedy rows with the helper graph, with
    the same answers."""
    path = model_repository() / TRANSLATOR / "1"
    manifest = load_manifest(path)
    fused = tmp_path / "decoder.onnx"
    fused.write_bytes(decoder_with_greedy(path / manifest.graph("fp32", "decoder").path))
    with pytest.raises(ValueError, match="already has names starting with 'greedy_'"):
        decoder_with_greedy(fused)

    def refuse(_: Path) -> bytes:
        raise ValueError("opset 11; the greedy nodes need 13 or later")

    monkeypatch.setattr("service.engine.decoder_with_greedy", refuse)
    engine = make_engine(TRANSLATOR, **PATHS["fixed"])
    bound = engine.backend
    assert isinstance(bound, BoundBackend) and bound.static and not bound.fused_greedy
    runs: list[int] = []
    helper = bound.helpers["greedy"]
    real = helper.run_with_iobinding

    def counted(*args: object) -> None:
        runs.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(helper, "run_with_iobinding", counted)
    texts = SOURCES[:3]
    results, _ = run_staggered(
        engine, [request(TRANSLATOR, t, max_new_tokens=20) for t in texts], [0, 1, 1]
    )
    expected = reference(TRANSLATOR, texts, DecodingOptions(max_new_tokens=20))
    for result, exp in zip(results, expected, strict=True):
        assert_same(result, exp)
    assert runs  # the helper reduced the greedy rows


def test_a_step_on_unpinned_caches_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binding a cache that is not the batch's fixed buffer would make a replayed graph read
    stale memory: the device path refuses it."""
    engine = engine_for(LM, "fixed")
    bound = engine.backend
    assert isinstance(bound, BoundBackend)
    buffers = bound.new_buffers(engine)
    assert buffers is not None
    shape = (engine.layers, 1, engine.heads, 16, engine.head_dim)
    feeds = {
        "input_ids": np.zeros((1, 1), dtype=np.int64),
        "positions": np.zeros(1, dtype=np.int64),
        "past_k": bound.zeros(shape),
        "past_v": bound.zeros(shape),
    }
    with pytest.raises(ValueError, match="past_k is not the batch's fixed buffer"):
        bound.decode(feeds, False, buffers)
    copies: list[str] = []
    real_helper = bound._helper

    def helper(name: str, feeds: dict[str, object], out: object = None) -> object:
        copies.append(name)
        return real_helper(name, feeds, out)

    monkeypatch.setattr(bound, "_helper", helper)
    pinned = bound.pin(feeds["past_k"], "past_k", buffers)
    assert pinned is not feeds["past_k"] and copies == ["gather"]
    np.testing.assert_array_equal(bound.host(pinned), bound.host(feeds["past_k"]))
    assert bound.pin(pinned, "past_k", buffers) is pinned and copies == ["gather"]


def test_a_host_input_is_copied_to_its_fixed_buffer_only_when_it_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each copy to a GPU is a synchronous transfer: the source mask, the same most steps,
    is copied only when its values change (and then they arrive)."""
    engine = engine_for(TRANSLATOR, "fixed")
    bound = engine.backend
    assert isinstance(bound, BoundBackend)
    buffers = bound.new_buffers(engine)
    assert buffers is not None
    mask = np.array([[True, True, False], [True, False, False]])
    fixed = bound._small(buffers, "src_mask", mask)
    copies: list[np.ndarray] = []
    real = type(fixed).update_inplace

    def update_inplace(value: object, data: np.ndarray) -> None:
        copies.append(data)
        real(value, data)

    monkeypatch.setattr(type(fixed), "update_inplace", update_inplace)
    assert bound._small(buffers, "src_mask", mask.copy()) is fixed and not copies
    changed = mask.copy()
    changed[1, 1] = True
    assert bound._small(buffers, "src_mask", changed) is fixed and len(copies) == 1
    np.testing.assert_array_equal(bound.host(fixed), changed)
    assert bound._small(buffers, "src_mask", changed) is fixed and len(copies) == 1
    mask[:] = False  # the caller's array changing later does not reach the buffer
    np.testing.assert_array_equal(bound.host(fixed), changed)


class _FlakyReplay:
    """A decoder session whose graph runs (gpu_graph_id > 0) go wrong: they add noise to
    the logits (every graph's, those after the first, or every graph's runs after its
    fourth: a replay on memory its capture left behind), or raise."""

    def __init__(self, session: ort.InferenceSession, fail: str) -> None:
        self.session, self.fail, self.graph_runs = session, fail, 0
        self.runs_of: dict[int, int] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)

    def run_with_iobinding(self, io: object, options: ort.RunOptions | None = None) -> None:
        graph_id = -1 if options is None else int(options.get_run_config_entry("gpu_graph_id"))
        graph = graph_id > 0
        if graph:
            self.graph_runs += 1
            self.runs_of[graph_id] = self.runs_of.get(graph_id, 0) + 1
            if self.fail == "raise":
                raise RuntimeError(
                    "CUDA error 900: operation not permitted when stream is capturing"
                )
        self.session.run_with_iobinding(io, options)  # type: ignore[arg-type]
        late = self.fail == "differ-after-4" and graph and self.runs_of[graph_id] > 4
        if late or (
            graph and (self.fail == "differ" or (self.fail == "differ-later" and graph_id > 1))
        ):
            logits = io.get_outputs()[0]  # type: ignore[attr-defined]
            logits.update_inplace(logits.numpy() + 1.0)


def _flaky_engine(fail: str) -> tuple[Engine, BoundBackend, _FlakyReplay, list[object]]:
    """An LM engine on fixed buffers whose decoder runs as `_FlakyReplay`, capture on."""
    engine = make_engine(LM, **PATHS["fixed"])
    bound = engine.backend
    assert isinstance(bound, BoundBackend)
    flaky = _FlakyReplay(bound.decoder_session, fail)
    plain_sessions: list[object] = []

    def plain() -> ort.InferenceSession:
        plain_sessions.append(flaky.session)
        return flaky.session

    bound.decoder_session = flaky  # type: ignore[assignment]
    bound.capture = bound._graph_session = True
    bound._plain_decoder = plain
    return engine, bound, flaky, plain_sessions


@pytest.mark.parametrize("fail", ["none", "differ", "differ-later", "differ-after-4", "raise"])
def test_cuda_graph_replays_are_checked_and_a_bad_one_falls_back(fail: str) -> None:
    """The capture path's control flow, run on the CPU (where a graph id is ignored): each
    new graph's first replay, and its RECHECK_REPLAY-th run, are checked against a plain
    run of the same bound step; a replay that differs or a capture that raises turns
    graphs off for good, on a session made without capture, and every answer still
    equals the reference (the noise here shifts every logit alike)."""
    engine, bound, flaky, plain_sessions = _flaky_engine(fail)
    reqs = [request(LM, t, max_new_tokens=30) for t in PROMPTS]
    results, _ = run_staggered(engine, reqs, JOIN_AT)
    for result, exp in zip(
        results, reference(LM, PROMPTS, DecodingOptions(max_new_tokens=30)), strict=True
    ):
        assert_same(result, exp)
    if fail == "none":
        assert bound.capture and not plain_sessions
        rechecked = sum(runs >= RECHECK_REPLAY for runs in bound._replays.values())
        assert len(bound._graph_ids) >= 3 and rechecked >= 1
        assert bound.verified_graphs == len(bound._graph_ids) + rechecked
        assert flaky.graph_runs > 2 * len(bound._graph_ids)  # replays beyond capture + check
    else:
        assert not bound.capture and not bound._graph_session and len(plain_sessions) == 1
        assert bound.decoder_session is flaky.session
        if fail == "differ-after-4":  # right at capture, caught at its recheck
            # its runs, and the replays of the check at capture and of the recheck
            assert max(flaky.runs_of.values()) == RECHECK_REPLAY + 2
        else:
            checked = {"differ": 1, "differ-later": 2, "raise": 0}  # the last one failed
            assert bound.verified_graphs == checked[fail]


def test_a_replay_passes_its_check_within_rounding_of_its_dtype() -> None:
    """fp16 logits of 8 to 16 lie 0.0078 apart: a replay three of those off a plain run
    (another kernel algorithm under capture) is a good one, in fp16 only; one logit 1.0
    off is not."""
    rng = np.random.default_rng(3)
    half = rng.uniform(-16, 16, size=(4, 1, 8000)).astype(np.float16)
    jitter = 3 * np.spacing(np.abs(half)) * rng.choice([-1, 1], size=half.shape)
    rounded = (half + jitter).astype(np.float16)
    assert replay_matches(rounded, half)
    assert not replay_matches(rounded.astype(np.float32), half.astype(np.float32))
    single = half.astype(np.float32)
    assert replay_matches(single * np.float32(1 + 1e-5), single)
    off = half.copy()
    off[2, 0, 17] += np.float16(1.0)
    assert not replay_matches(off, half)


def _items(engine: Engine, texts: list[str], first_key: int) -> list[BatchItem]:
    return [
        BatchItem(first_key + i, r, engine.encode(r.text), False)
        for i, r in enumerate(request(LM, t, max_new_tokens=30) for t in texts)
    ]


def test_newcomers_on_fixed_buffers_are_never_encoded_on_a_helper_thread() -> None:
    """A device backend's graphs and bound shapes belong to the engine thread: given a
    helper thread anyway, a round takes its newcomers in on its own thread, first, and
    they join this step."""

    class Refusing(ThreadPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a fixed-buffer engine used the helper thread")

    engine, _, _, _ = _flaky_engine("none")
    assert not engine.overlaps_admission
    batch = engine.new_batch()
    batch.add(_items(engine, PROMPTS[:2], 0))
    batch.step()
    with Refusing(1) as helper:
        added, out, _, refused = batch.step_taking_in(_items(engine, PROMPTS[2:4], 2), helper)
    assert refused is None and added.rows == 2 and len(batch) == 4
    assert {2, 3} <= set(out.progressed)  # they joined this step


def test_a_graph_id_belongs_to_the_thread_that_captured_it() -> None:
    """onnxruntime keeps a session's graphs per thread: a step shape first run on another
    thread gets a graph id of its own, captured alone and checked, as a new one is. So does
    one run on a thread started after another ended, which Python may give the same
    threading.get_ident()."""
    engine, bound, _, _ = _flaky_engine("none")
    batch = engine.new_batch()
    batch.add(_items(engine, PROMPTS[:2], 0))
    batch.step()
    batch.step()
    idents = set()
    for _ in range(3):
        worker = threading.Thread(target=batch.step)
        worker.start()
        worker.join()
        idents.add(worker.ident)
        shape = next(reversed(bound._graph_ids))[2:]  # the step just run
        batch = engine.new_batch()  # the same shape again on the next thread
        batch.add(_items(engine, PROMPTS[:2], 0))
        batch.step()
        batch.step()
        assert next(reversed(bound._graph_ids))[2:] == shape
    threads = {graph[0] for graph in bound._graph_ids}
    assert len(threads) == 4  # this thread and each worker, whatever their idents
    assert bound.verified_graphs == len(bound._graph_ids)


def test_a_fresh_batch_after_a_failed_step_replays_the_graphs_of_the_batch_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime frees no captured graph before its session goes: the batch the scheduler
    makes after a failed step takes the fixed buffers of the one gone (the failure's
    traceback holds that one until the next failure), so its step shapes replay their
    graphs instead of each being captured again, a graph more per failure. Batches alive
    at once never share buffers."""
    engine, bound, _, _ = _flaky_engine("none")

    def one_round(batch: Batch, first_key: int) -> None:
        batch.add(_items(engine, PROMPTS[:2], first_key))
        for _ in range(3):
            batch.step()

    batch = engine.new_batch()
    one_round(batch, 0)
    graphs = dict(bound._graph_ids)
    assert graphs and bound.capture

    def out_of_memory(*_: object) -> None:
        raise RuntimeError("CUDA out of memory")

    last_error: BaseException | None = None
    for attempt in range(3):
        with monkeypatch.context() as patch:
            patch.setattr(bound, "write_kv", out_of_memory)
            try:
                batch.step()
            except RuntimeError as error:  # kept, as the scheduler keeps its last error
                last_error = error
        batch = engine.new_batch()  # what the scheduler does after a failed step
        one_round(batch, 10 * (attempt + 1))
    assert last_error is not None
    # Two sets of buffers (the last failed batch's is alive), each captured once.
    assert len({buffers for _, buffers, _, _, _ in bound._graph_ids}) == 2
    assert len(bound._graph_ids) == 2 * len(graphs)
    rechecked = sum(runs >= RECHECK_REPLAY for runs in bound._replays.values())
    assert bound.verified_graphs == len(bound._graph_ids) + rechecked and bound.capture
    other = engine.new_batch()
    assert other.buffers is not None and other.buffers is not batch.buffers


def test_a_fallback_drops_the_capture_session_with_every_binding_to_it() -> None:
    """After a bad replay the capture session goes at once (under the device lock), with
    the bindings of the step shapes it had captured, not only the failing one's."""
    engine, bound, flaky, plain_sessions = _flaky_engine("differ-later")
    batch = engine.new_batch()
    batch.add(_items(engine, PROMPTS[:2], 0))
    batch.step()  # graph 1, checked and kept
    assert bound.capture and len(batch.buffers.bindings) == 1  # type: ignore[union-attr]
    batch.add(_items(engine, PROMPTS[2:5], 2))  # more rows: a new step shape, graph 2
    for _ in range(3):
        batch.step()
    assert not bound.capture and len(plain_sessions) == 1
    sessions = [s for s, _, _ in batch.buffers.bindings.values()]  # type: ignore[union-attr]
    assert sessions and all(s is flaky.session for s in sessions)


def test_close_frees_the_sessions_and_the_device_buffers_now() -> None:
    engine = make_engine(LM, **PATHS["fixed"])
    bound = engine.backend
    assert isinstance(bound, BoundBackend)
    batch = engine.new_batch()
    batch.add(_items(engine, PROMPTS[:3], 0))
    batch.step()
    assert batch.buffers is not None and batch.buffers.values and batch.buffers.bindings
    gone = [weakref.ref(bound.decoder_session)]
    gone += [weakref.ref(s) for s in bound.helpers.values()]
    held = [id(v) for v in vars(batch).values()]  # the batch's own: they go with it
    gone += [weakref.ref(v) for v in batch.buffers.values.values() if id(v) not in held]
    engine.close()
    assert not batch.buffers.values and not batch.buffers.bindings
    assert all(ref() is None for ref in gone)
    assert not hasattr(bound, "decoder_session")


def test_a_fallback_warms_the_new_session_on_the_shapes_reached_before_its_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decoder session made at a fallback has run nothing (warm-up ran the capture
    session): before the failing step runs on it, each step shape the graphs had reached
    runs once on zeros of its own (not on a batch's buffers), the failing one among them,
    and the answers still equal the reference."""
    from service import backends

    engine, bound, flaky, _ = _flaky_engine("differ-later")
    bindings: list[tuple[object, tuple[int, int, int], int, bool]] = []  # io, shape, width, fixed
    real_bind = backends.bind_layers

    def bind_layers(io: Any, feeds: dict[str, Any], device: str, device_id: int = 0) -> None:
        k = feeds["past_k"]
        source = feeds["cross_k"].shape()[3] if "cross_k" in feeds else 0
        fixed = any(k is v for b in list(bound._buffers) for v in b.values.values())
        shape = (k.shape()[1], k.shape()[3], source)
        bindings.append((io, shape, feeds["input_ids"].shape[1], fixed))
        real_bind(io, feeds, device, device_id)

    runs: list[tuple[tuple[int, int, int], int, bool]] = []  # on the new session

    class Plain:
        def __init__(self, session: ort.InferenceSession) -> None:
            self.session = session

        def __getattr__(self, name: str) -> object:
            return getattr(self.session, name)

        def run_with_iobinding(self, io: Any, options: ort.RunOptions | None = None) -> None:
            runs.append(next((s, w, f) for b, s, w, f in reversed(bindings) if b is io))
            self.session.run_with_iobinding(io, options)

    reached: list[tuple[int, int, int]] = []
    stop_capture = bound._stop_capture

    def stop() -> bool:
        reached.extend(dict.fromkeys((r, c, s) for _, _, r, c, s in bound._graph_ids))
        return stop_capture()

    monkeypatch.setattr(backends, "bind_layers", bind_layers)
    monkeypatch.setattr(bound, "_stop_capture", stop)
    bound._plain_decoder = lambda: Plain(flaky.session)  # type: ignore[assignment,return-value]
    reqs = [request(LM, t, max_new_tokens=30) for t in PROMPTS]
    results, _ = run_staggered(engine, reqs, JOIN_AT)
    for result, exp in zip(
        results, reference(LM, PROMPTS, DecodingOptions(max_new_tokens=30)), strict=True
    ):
        assert_same(result, exp)
    assert not bound.capture and len(reached) >= 2
    first = next(i for i, (_, _, fixed) in enumerate(runs) if fixed)  # the failing step's
    assert runs[:first] == [(shape, 1, False) for shape in reached]
    assert runs[first] == (reached[-1], 1, True)


@pytest.mark.parametrize(("fail", "before"), [("encoder", 1), ("provider", 2), ("helper", 4)])
def test_a_cuda_engine_that_fails_to_load_frees_its_sessions_under_the_lock(
    fail: str, before: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sessions made before a load fails (at the encoder's, at the provider check, at
    a helper's) go at once, under the device lock held alone as Engine.close frees them:
    left to the traceback, they would go on any thread, perhaps during another model's
    capture. A pretend GPU: fake sessions note whether the lock was held as they went."""
    from types import SimpleNamespace

    from service import engine as engine_module
    from service.device import DEVICE_LOCK

    made: list[int] = []
    alone_when_freed: dict[int, bool] = {}

    def freed(index: int) -> None:
        alone_when_freed[index] = DEVICE_LOCK._writer == threading.get_ident()

    class FakeSession:  # made in order: decoder (capture), encoder, then the helpers
        def __init__(self, source: object, options: object, providers: object) -> None:
            index = len(made)
            if (fail, index) in {("encoder", 1), ("helper", 4)}:
                raise RuntimeError("CUDA failure 2: out of memory")
            made.append(index)
            weakref.finalize(self, freed, index)

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider" if fail == "provider" else CUDA]

        def get_outputs(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(name=n, type="tensor(float)") for n in ("logits", "new_k")]

    monkeypatch.setattr(engine_module, "cuda_available", lambda: True)
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.raises(RuntimeError, match=r"out of memory|asked for"):
        make_engine(TRANSLATOR, provider="cuda")
    assert made == list(range(before))
    assert alone_when_freed == dict.fromkeys(made, True)


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("1.31.1", True),
        ("1.32.0", True),
        ("1.32.0.dev20261001", True),
        ("1.31.1+cu13", True),
        ("2.0", True),
        ("1.31.0", False),
        ("1.18.1", False),
        ("1.9.0", False),
    ],
)
def test_graphs_need_an_onnxruntime_with_the_replay_fix(version: str, supported: bool) -> None:
    assert graphs_supported(version) is supported


@pytest.mark.parametrize("path", ["iobinding", "fixed"])
@pytest.mark.parametrize("name", [TRANSLATOR, LM])
def test_every_binding_is_made_under_the_device_lock(
    path: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime copies a host array to the device when it is bound, not when the
    session runs: a bind outside the lock could break another thread's graph capture."""
    from contextlib import contextmanager

    from onnxruntime.capi.onnxruntime_inference_collection import IOBinding

    engine = make_engine(name, **PATHS[path])
    bound = engine.backend
    assert isinstance(bound, BoundBackend)
    depth = [0]
    outside: list[str] = []

    @contextmanager
    def shared() -> Iterator[None]:
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(bound, "_shared", shared)
    for method in ("bind_cpu_input", "bind_ortvalue_input", "bind_output", "bind_ortvalue_output"):
        real = getattr(IOBinding, method)

        def checked(self: object, *args: object, _real: Any = real, _name: str = method) -> Any:
            if not depth[0]:
                outside.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(IOBinding, method, checked)
    texts = TEXTS[name][:3]
    batch = engine.new_batch()
    batch.add(
        [
            BatchItem(i, request(name, t, max_new_tokens=8), engine.encode(t))
            for i, t in enumerate(texts)
        ]
    )
    finished = 0
    while len(batch):
        finished += len(batch.step().finished)
    assert finished == len(texts)
    assert not outside, sorted(set(outside))

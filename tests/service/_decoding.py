"""Shared by the engine and backend tests: engines on the three step paths, staggered
batches, and the PyTorch reference decoder's answers to compare with."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pytest

from export.manifest import load_manifest
from service.domain import DecodingParams, SequenceRequest, SequenceResult, Task
from service.engine import BatchItem, Engine, EngineOptions
from tests.service._engine_models import (
    LM,
    PROMPTS,
    SOURCES,
    TRANSLATOR,
    model_repository,
    reference_model,
)
from transformer import decoding
from transformer.decoding import DecodingOptions, Hypothesis

TASK = {TRANSLATOR: Task.TRANSLATION, LM: Task.GENERATION}
TEXTS = {TRANSLATOR: SOURCES, LM: PROMPTS}
JOIN_AT = [0, 0, 3, 3, 7, 12]  # the step at which each text joins the batch


def make_engine(name: str, **options: object) -> Engine:
    path = model_repository() / name / "1"
    base: dict[str, object] = dict(cpu_variant="fp32", max_batch_size=32, intra_op_threads=1)
    base.update(options)
    return Engine(path, load_manifest(path), EngineOptions(**base))  # type: ignore[arg-type]


# The engine's three ways to run a step: numpy arrays (CPU), the device path with
# IOBinding, and the device path on fixed per-shape buffers (what CUDA graphs replay on;
# on the CPU the same buffers and bindings, without capture).
PATHS: dict[str, dict[str, object]] = {
    "numpy": {},
    "iobinding": {"io_binding": True, "cuda_graphs": False},
    "fixed": {"io_binding": True, "cuda_graphs": True},
}
_ENGINES: dict[tuple[str, str], Engine] = {}


def engine_for(name: str, path: str = "numpy") -> Engine:
    key = (name, path)
    if key not in _ENGINES:
        _ENGINES[key] = make_engine(name, **PATHS[path])
    return _ENGINES[key]


def request(name: str, text: str, **params: object) -> SequenceRequest:
    """A request asking for its scores unless told not to (the reference has them)."""
    params.setdefault("return_scores", True)
    return SequenceRequest(TASK[name], text, DecodingParams(**params))  # type: ignore[arg-type]


def run_staggered(
    engine: Engine,
    requests: Sequence[SequenceRequest],
    join_at: Sequence[int],
    stream: bool = False,
) -> tuple[list[SequenceResult], dict[Hashable, list[tuple[list[int], str]]]]:
    """Requests join the batch at their step; returns results and streamed events."""
    batch = engine.new_batch()
    results: dict[Hashable, SequenceResult] = {}
    events: dict[Hashable, list[tuple[list[int], str]]] = {i: [] for i in range(len(requests))}
    step = 0
    while len(results) < len(requests):
        joining = [
            BatchItem(i, r, engine.encode(r.text), stream)
            for i, r in enumerate(requests)
            if join_at[i] == step
        ]
        batch.add(joining)
        out = batch.step()
        for key, event in out.events:
            events[key].append((event.token_ids, event.text))
        for key, result in out.finished:
            results[key] = result
        step += 1
        assert step < 500
    return [results[i] for i in range(len(requests))], events


def reference(name: str, texts: Sequence[str], options: DecodingOptions) -> list[list[Hypothesis]]:
    engine = engine_for(name)
    ids = [engine.encode(t) for t in texts]
    model = reference_model(name)
    if name == TRANSLATOR:
        return decoding.translate(model, ids, options)  # type: ignore[arg-type]
    return decoding.generate(model, ids, options)  # type: ignore[arg-type]


def assert_same(
    result: SequenceResult, expected: list[Hypothesis], align: bool = False, scored: bool = True
) -> None:
    """The result is the reference's: tokens, finish reasons, and its scores if it asked
    for them (`scored`; a request that did not has none summed: 0)."""
    got = result.hypotheses
    assert [h.token_ids for h in got] == [h.tokens for h in expected]
    assert [h.finish_reason.value for h in got] == [h.finish_reason for h in expected]
    for g, e in zip(got, expected, strict=True):
        assert g.score == pytest.approx(e.score if scored else 0.0, abs=1e-3)
        assert g.normalized_score == pytest.approx(e.normalized_score if scored else 0.0, abs=1e-3)
        if align:
            assert g.alignment is not None and e.alignment is not None
            np.testing.assert_allclose(np.array(g.alignment), np.array(e.alignment), atol=1e-4)

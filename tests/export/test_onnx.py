"""Exported graphs run by onnxruntime against the PyTorch model: logits, greedy tokens,
cache growth, mixed positions in one batch, fp16 cache dtype and metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.manifest import graph_io
from export.onnx_export import EXPORT_VERSION
from export.runtime import (
    OrtModel,
    greedy_generate,
    greedy_translate,
    grow_cache,
    teacher_forced_logits,
)
from transformer.checkpoint import file_sha256
from transformer.decoding import DecodingOptions, generate, translate

# Max-abs logits error vs PyTorch fp32 for the tiny models (logits of magnitude ~10).
TOLERANCE = {"fp32": 1e-4, "fp16": 0.05, "int8": 1.5}
TRANSLATORS = ["translator-post", "translator-pre", "translator-dynamo"]
LMS = ["lm-pre", "lm-post"]


def _sources(vocab: int, n: int = 12, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        [int(t) for t in rng.integers(4, vocab, int(rng.integers(1, 14)))] + [3] for _ in range(n)
    ]


def _prompts(vocab: int, n: int = 8, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        [2] + [int(t) for t in rng.integers(4, vocab, int(rng.integers(0, 10)))] for _ in range(n)
    ]


def _torch_logits(
    model: torch.nn.Module, sources: list[list[int]] | None, targets: list[list[int]]
) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for i, tgt in enumerate(targets):
            if sources is not None:
                logits = model(torch.tensor([sources[i]]), torch.tensor([tgt]))
            else:
                logits = model(torch.tensor([tgt]))
            out.append(logits[0].numpy())
    return out


def _max_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x.astype(np.float32) - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", TRANSLATORS)
def test_translator_logits_and_greedy_match_pytorch(exported, kind: str) -> None:
    e = exported(kind)
    sources = _sources(e.model.config.vocab_size)
    expected = [
        h[0].tokens for h in translate(e.model, sources, DecodingOptions(max_new_tokens=20))
    ]
    targets = [[e.model.config.decoder_start_id, *t] for t in expected]
    reference = _torch_logits(e.model, sources, targets)
    for variant in e.manifest.variants:
        ort_model = OrtModel(e.version_dir, variant, threads=1)
        error = _max_error(teacher_forced_logits(ort_model, sources, targets), reference)
        assert error <= TOLERANCE[variant], (variant, error)
        if variant == "fp32":
            assert greedy_translate(ort_model, sources, 20) == expected


def test_translator_outputs_end_both_ways(exported) -> None:
    """The fixture's EOS bias makes greedy runs end with EOS and with the length limit."""
    e = exported("translator-post")
    tokens = greedy_translate(
        OrtModel(e.version_dir, threads=1), _sources(e.model.config.vocab_size), 20
    )
    lengths = {len(t) for t in tokens}
    assert 20 in lengths and min(lengths) < 20


@pytest.mark.parametrize("kind", LMS)
def test_lm_logits_and_greedy_match_pytorch(exported, kind: str) -> None:
    e = exported(kind)
    prompts = _prompts(e.model.config.vocab_size)
    expected = [h[0].tokens for h in generate(e.model, prompts, DecodingOptions(max_new_tokens=16))]
    sequences = [[*p, *t] for p, t in zip(prompts, expected, strict=True)]
    reference = _torch_logits(e.model, None, sequences)
    for variant in e.manifest.variants:
        ort_model = OrtModel(e.version_dir, variant, threads=1)
        error = _max_error(teacher_forced_logits(ort_model, None, sequences), reference)
        assert error <= TOLERANCE[variant], (variant, error)
        if variant == "fp32":
            assert greedy_generate(ort_model, prompts, 16) == expected


def test_decoding_to_the_last_position_and_not_past_it(exported) -> None:
    """Up to max_positions the runtime decodes; a request that would go past it is
    refused up front, naming the limit, not met by an out-of-bounds Gather mid-decode."""
    lm, translator = exported("lm-pre"), exported("translator-post")
    limit = lm.model.config.max_positions
    prompt = [lm.model.config.bos_id, *[5] * (limit - 6)]
    model = OrtModel(lm.version_dir, threads=1)
    assert len(greedy_generate(model, [prompt], 6)[0]) <= 6  # last position: limit - 1
    with pytest.raises(ValueError, match=f"max_positions {limit}"):
        greedy_generate(model, [prompt], 7)
    with pytest.raises(ValueError, match=f"max_positions {limit}"):
        teacher_forced_logits(model, None, [[*prompt, *[5] * 6]])
    model = OrtModel(translator.version_dir, threads=1)
    limit = translator.model.config.max_positions
    assert greedy_translate(model, [[5] * (limit - 1) + [3]], limit)
    with pytest.raises(ValueError, match=f"max_positions {limit}"):
        greedy_translate(model, [[5, 3]], limit + 1)
    with pytest.raises(ValueError, match=f"max_positions {limit}"):
        greedy_translate(model, [[5] * limit + [3]], 4)


def test_lm_prefill_logits(exported) -> None:
    """T > 1: one call over right-padded prompts gives every prompt position's logits."""
    e = exported("lm-pre")
    ort_model = OrtModel(e.version_dir, threads=1)
    prompts = _prompts(e.model.config.vocab_size)
    width = max(len(p) for p in prompts)
    ids = np.array([[*p, *[0] * (width - len(p))] for p in prompts])
    out = ort_model.step(ids, np.zeros(len(prompts)), *ort_model.new_cache(len(prompts), 16))
    for row, prompt in enumerate(prompts):
        (ref,) = _torch_logits(e.model, None, [prompt])
        assert np.abs(out.logits[row, : len(prompt)] - ref).max() < 1e-4


def test_growing_the_cache_continues_identically(exported) -> None:
    e = exported("translator-post")
    m = OrtModel(e.version_dir, threads=1)
    src_ids = np.array([[5, 6, 7, 8, 3]])
    src = (*m.encode(src_ids, np.ones_like(src_ids, dtype=bool)), np.ones((1, 5), dtype=bool))
    tokens = np.array([[2, 9, 10, 11, 12, 13, 14, 15, 16, 17]])

    def run(capacity_before: int, grow_at: int) -> np.ndarray:
        k, v = m.new_cache(1, capacity_before)
        logits = []
        for t in range(tokens.shape[1]):
            if t == grow_at:
                k, v = grow_cache(k, 32), grow_cache(v, 32)
            out = m.step(tokens[:, t : t + 1], np.array([t]), k, v, *src)
            k, v = out.present_k, out.present_v
            logits.append(out.logits[:, 0])
        return np.stack(logits, axis=1)

    # Same values up to float rounding (the reductions run over a different length).
    np.testing.assert_allclose(run(4, 4), run(32, -1), atol=1e-5)


def test_rows_at_different_positions_equal_running_alone(exported) -> None:
    e = exported("translator-post")
    m = OrtModel(e.version_dir, threads=1)
    sources = [[5, 6, 7, 3], [8, 9, 10, 11, 12, 13, 3]]
    targets = [[2, 20, 21, 22, 23, 24], [2, 30, 31]]
    alone = [teacher_forced_logits(m, [s], [t])[0] for s, t in zip(sources, targets, strict=True)]
    # Together: row 1 runs its 3 tokens while row 0 is already at position 3; stale cache
    # values (7.0) sit beyond each row's length.
    src_ids = np.array([[5, 6, 7, 3, 0, 0, 0], sources[1]])
    src_mask = src_ids != 0
    src_mask[1] = True
    cross = (*m.encode(src_ids, src_mask), src_mask)
    k, v = m.new_cache(2, 16)
    k[:] = 7.0
    v[:] = 7.0
    # First row 0 alone for 3 steps in this batch (row 1 fed padding, then overwritten).
    for t in range(3):
        out = m.step(np.array([[targets[0][t]], [0]]), np.array([t, 0]), k, v, *cross)
        k, v = out.present_k, out.present_v
    for t in range(3):
        out = m.step(
            np.array([[targets[0][3 + t]], [targets[1][t]]]), np.array([3 + t, t]), k, v, *cross
        )
        k, v = out.present_k, out.present_v
        np.testing.assert_allclose(out.logits[0, 0], alone[0][3 + t], atol=1e-5)
        np.testing.assert_allclose(out.logits[1, 0], alone[1][t], atol=1e-5)


def test_cross_attention_output_is_last_layer_mean(exported) -> None:
    e = exported("translator-pre")
    m = OrtModel(e.version_dir, threads=1)
    src = [[5, 6, 7, 8, 3]]
    src_ids = np.array(src)
    mask = np.ones_like(src_ids, dtype=bool)
    cross = (*m.encode(src_ids, mask), mask)
    out = m.step(np.array([[2, 9, 10]]), np.array([0]), *m.new_cache(1, 16), *cross)
    with torch.inference_mode():
        memory, _ = e.model.encode(torch.tensor(src))
        ref = e.model.decode(
            torch.tensor([[2, 9, 10]]),
            e.model.cross_kv(memory),
            torch.tensor(mask),
            need_weights=True,
        )
    expected = ref.cross_attention[-1].mean(dim=1).numpy()
    assert out.cross_attention is not None  # a translator's decoder returns it
    np.testing.assert_allclose(out.cross_attention, expected, atol=1e-5)
    np.testing.assert_allclose(out.cross_attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["translator-post", "lm-pre", "translator-dynamo"])
def test_graph_io_dtypes_and_metadata(exported, kind: str) -> None:
    e = exported(kind)
    cfg = e.model.config
    for variant, files in e.manifest.variants.items():
        for graph, entry in files.files.items():
            model = onnx.load(str(e.version_dir / entry.path))
            meta = {p.key: p.value for p in model.metadata_props}
            assert json.loads(meta["config"]) == cfg.to_dict()
            assert meta["tokenizer_sha256"] == file_sha256(e.checkpoint / "tokenizer.model")
            assert (meta["variant"], meta["graph"]) == (variant, graph)
            assert meta["export_version"] == EXPORT_VERSION
            # onnxruntime's CUDA GatherND re-read a freed host buffer in CUDA graph replays
            # (before PR #32120): sinusoidal positions are looked up with Gather
            assert "GatherND" not in {node.op_type for node in model.graph.node}, graph
            opset = {o.domain: o.version for o in model.opset_import}
            assert opset.get("", opset.get("ai.onnx", 0)) >= 17
            inputs, outputs = graph_io(
                e.manifest.task, graph, variant, cfg.n_decoder_layers, cfg.n_heads,
                cfg.head_dim, cfg.vocab_size,
            )  # fmt: skip
            assert [i.name for i in model.graph.input] == [s.name for s in inputs]
            assert [o.name for o in model.graph.output] == [s.name for s in outputs]
            shapes = [
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]
            ]
            assert shapes == [s.shape for s in [*inputs, *outputs]]


def test_fp16_keeps_the_cache_in_fp16(exported) -> None:
    """No Cast touches a cache or cross K/V input or a cache output."""
    e = exported("translator-post")
    for graph in ("encoder", "decoder"):
        model = onnx.load(str(e.version_dir / e.manifest.graph("fp16", graph).path))
        fp16 = onnx.TensorProto.FLOAT16
        for value in [*model.graph.input, *model.graph.output]:
            if value.name not in ("src_ids", "src_mask", "input_ids", "positions"):
                assert value.type.tensor_type.elem_type == fp16, value.name
        cached = ("past_k", "past_v", "cross_k", "cross_v", "new_k", "new_v")
        for node in model.graph.node:
            if node.op_type == "Cast":
                assert not any(n.startswith(cached) for n in [*node.input, *node.output]), node
            # Casts a CPU session inserts for ops without fp16 kernels must not be saved.
            assert not node.name.startswith("InsertedPrecisionFreeCast"), node.name
    m = OrtModel(e.version_dir, "fp16", threads=1)
    mask = np.ones((1, 2), dtype=bool)
    out = m.step(
        np.array([[2]]),
        np.array([0]),
        *m.new_cache(1, 16),
        *m.encode(np.array([[5, 3]]), mask),
        mask,
    )
    assert out.present_k.dtype == np.float16 and out.logits.dtype == np.float16


def test_int8_weights_are_quantized(exported) -> None:
    e = exported("translator-post")
    fp32 = (e.version_dir / e.manifest.graph("fp32", "decoder").path).stat().st_size
    int8 = (e.version_dir / e.manifest.graph("int8", "decoder").path).stat().st_size
    model = onnx.load(str(e.version_dir / e.manifest.graph("int8", "decoder").path))
    int8_weights = [
        t
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    ]
    assert int8_weights and int8 < fp32


def test_int8_quantizes_a_tied_output_layer(tmp_path) -> None:
    """The dynamo exporter leaves a large tied output layer as MatMul(x, Transpose(W));
    int8 must quantize that MatMul too, not dequantize its whole weight at every call."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_export import _quantize_int8

    rng = np.random.default_rng(0)
    table = rng.standard_normal((40, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["W", "ids"], ["h"]),
            helper.make_node("Transpose", ["W"], ["W_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["h", "W_t"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 40])],
        [numpy_helper.from_array(table, "W")],
    )
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    _quantize_int8(src, dst)
    model = onnx.load(str(dst))
    assert [n.op_type for n in model.graph.node if n.op_type == "MatMul"] == []
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node)
    ids = np.array([[1, 5, 39]])
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids}
    )[0]
    np.testing.assert_allclose(got, table[ids] @ table.T, atol=0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]

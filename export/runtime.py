"""A minimal numpy + onnxruntime runner of an exported version, following the contract.

It is the reference the parity check and the tests use (and a worked example for the
serving engine): encode once, then one decoder step per token over a [L, B, H, C, Dh]
cache whose capacity C is a power-of-two bucket grown by copying, rows dropped from the
batch as they finish. The decoder returns only the new keys and values; `write_cache`
puts them into the cache in place. No torch here: it runs in the serving image.

Greedy decoding follows transformer.decoding exactly: argmax of the raw logits (ties to
the lowest id), EOS ends a row and is not returned, max_new_tokens ends it with "length".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.manifest import FLOAT_DTYPE, Manifest, load_manifest

MIN_CAPACITY = 16


def bucket(length: int, minimum: int = MIN_CAPACITY) -> int:
    """The cache capacity for `length` tokens: the next power of two, at least `minimum`."""
    capacity = minimum
    while capacity < length:
        capacity *= 2
    return capacity


def grow_cache(cache: np.ndarray, capacity: int) -> np.ndarray:
    """Copy a [L, B, H, C, Dh] cache into a larger capacity (nothing is recomputed)."""
    if capacity <= cache.shape[3]:
        return cache
    shape = list(cache.shape)
    shape[3] = capacity
    grown = np.zeros(shape, dtype=cache.dtype)
    grown[:, :, :, : cache.shape[3]] = cache
    return grown


STACKED = ("past_k", "past_v", "cross_k", "cross_v")


def layer_feeds(feeds: dict[str, Any]) -> dict[str, Any]:
    """Decoder feeds with each stacked [L, ...] cache given as the contract's per-layer
    inputs `<name>_<i>`: slices of a C-contiguous stack, which onnxruntime reads in place."""
    out = {k: v for k, v in feeds.items() if k not in STACKED}
    for name in STACKED:
        if name in feeds:
            stack = feeds[name]
            out.update({f"{name}_{i}": stack[i] for i in range(stack.shape[0])})
    return out


def bind_layers(binding: Any, feeds: dict[str, Any], device: str, device_id: int = 0) -> None:
    """IOBinding of the stacked device caches in `feeds` (OrtValues [L, ...]) as the
    per-layer inputs, each bound to its layer's slice of the same device buffer."""
    for name in STACKED:
        if name not in feeds:
            continue
        stack = feeds[name]
        shape = stack.shape()
        dtype = np.float16 if stack.data_type() == "tensor(float16)" else np.float32
        layer_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        for i in range(shape[0]):
            binding.bind_input(
                f"{name}_{i}", device, device_id, dtype, list(shape[1:]),
                stack.data_ptr() + i * layer_bytes,
            )  # fmt: skip


def write_cache(cache: np.ndarray, new: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Write new [L, B, H, T, Dh] into cache [L, B, H, C, Dh] at slots positions[b] + t,
    in place (the contract's cache update); returns cache."""
    steps = new.shape[3]
    rows = np.arange(new.shape[1])[:, None]  # [B, 1]
    slots = positions[:, None] + np.arange(steps)[None, :]  # [B, T]
    # Advanced indices on axes 1 and 3 (split by a slice) move to the front: [B, T, L, H, Dh].
    cache[:, rows, :, slots, :] = new.transpose(1, 3, 0, 2, 4)
    return cache


def cache_write_indices(shape: Sequence[int], positions: np.ndarray, steps: int) -> np.ndarray:
    """ScatterND indices [L, B, H, T, 4] of the same write, for a cache of `shape` that lives
    on a device (see `cache_write_graph`)."""
    layers, rows, heads = shape[0], shape[1], shape[2]
    grid = np.meshgrid(
        np.arange(layers), np.arange(rows), np.arange(heads), np.arange(steps), indexing="ij"
    )
    slots = positions[grid[1]] + grid[3]
    return np.stack([grid[0], grid[1], grid[2], slots], axis=-1).astype(np.int64)


def onnx_bytes(graph: Any) -> bytes:
    """A serialized opset-17 model of `graph`: the small helper graphs run beside ours."""
    from onnx import helper

    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return bytes(proto.SerializeToString())


def cache_write_graph(elem_type: int, suffixes: Sequence[str] = ("",)) -> bytes:
    """ONNX graph y = ScatterND(cache, idx, new): `write_cache` for device-resident caches
    (onnxruntime writes into a new buffer; the caller swaps it in). With several `suffixes`
    (e.g. "_k", "_v") it writes as many caches (`cache_k` with `new_k` into `y_k`, ...) in
    one run, sharing one `idx`."""
    from onnx import TensorProto, helper

    cache, new = ["L", "B", "H", "C", "D"], ["L", "B", "H", "T", "D"]
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["L", "B", "H", "T", 4])
    nodes = [
        helper.make_node("ScatterND", [f"cache{x}", "idx", f"new{x}"], [f"y{x}"]) for x in suffixes
    ]
    graph = helper.make_graph(
        nodes,
        "cache_write",
        [
            *(helper.make_tensor_value_info(f"cache{x}", elem_type, cache) for x in suffixes),
            idx,
            *(helper.make_tensor_value_info(f"new{x}", elem_type, new) for x in suffixes),
        ],
        [helper.make_tensor_value_info(f"y{x}", elem_type, cache) for x in suffixes],
    )
    return onnx_bytes(graph)


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, T, V]
    present_k: np.ndarray  # [L, B, H, C, Dh]: the past cache, written in place
    present_v: np.ndarray
    cross_attention: np.ndarray | None  # [B, T, S] (translator)


class OrtModel:
    """The sessions of one variant of a version folder."""

    def __init__(
        self,
        version_dir: str | Path,
        variant: str = "fp32",
        providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",),
        threads: int = 0,
        manifest: Manifest | None = None,
    ) -> None:
        self.root = Path(version_dir)
        self.manifest = manifest or load_manifest(self.root, variants=[variant])
        self.variant = variant
        self.dtype = np.dtype(FLOAT_DTYPE[variant])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # The files are already optimized offline; a light online pass costs little.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED

        def session(graph: str) -> ort.InferenceSession:
            path = self.root / self.manifest.graph(variant, graph).path
            return ort.InferenceSession(str(path), options, providers=list(providers))

        self.encoder = session("encoder") if self.manifest.task == "translation" else None
        self.decoder = session("decoder")
        cache = self.manifest.cache
        self.layers, self.heads, self.head_dim = cache.layers, cache.heads, cache.head_dim
        self.ids = self.manifest.special_ids

    def new_cache(self, batch: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch, self.heads, capacity, self.head_dim)
        return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """src_ids [B, S] int64, src_mask [B, S] bool -> cross_k, cross_v [L, B, H, S, Dh]."""
        if self.encoder is None:
            raise ValueError(f"{self.manifest.name} is a language model: it has no encoder")
        cross_k, cross_v = self.encoder.run(
            None, {"src_ids": src_ids.astype(np.int64), "src_mask": src_mask.astype(bool)}
        )
        return cross_k, cross_v

    def step(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        past_k: np.ndarray,
        past_v: np.ndarray,
        cross_k: np.ndarray | None = None,
        cross_v: np.ndarray | None = None,
        src_mask: np.ndarray | None = None,
    ) -> StepOutput:
        """One decoder call: input_ids [B, T] at positions[b] .. positions[b] + T - 1. The
        new keys and values are written into past_k / past_v in place (returned as present)."""
        feeds: dict[str, Any] = {
            "input_ids": input_ids.astype(np.int64),
            "positions": positions.astype(np.int64),
            "past_k": past_k,
            "past_v": past_v,
        }
        if self.encoder is not None:
            if cross_k is None or cross_v is None or src_mask is None:
                raise ValueError("a translator step needs cross_k, cross_v and src_mask")
            feeds.update(cross_k=cross_k, cross_v=cross_v, src_mask=src_mask.astype(bool))
        outputs = self.decoder.run(None, layer_feeds(feeds))
        positions = feeds["positions"]
        return StepOutput(
            logits=outputs[0],
            present_k=write_cache(past_k, outputs[1], positions),
            present_v=write_cache(past_v, outputs[2], positions),
            cross_attention=outputs[3] if len(outputs) > 3 else None,
        )


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to [B, max_len] int64 and the [B, max_len] bool mask of real tokens."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
    lengths = np.array([len(s) for s in sequences])
    return ids, np.arange(width)[None, :] < lengths[:, None]


def _check_positions(model: OrtModel, inputs: Sequence[Sequence[int]], last: int) -> None:
    """Refuse a decode that would reach past the model's positional table: position `last`
    or a source longer than it. The graph would meet it as an out-of-bounds Gather deep
    inside, after the work before it (an onnxruntime error naming a node)."""
    limit = model.manifest.limits.max_positions
    longest = max((len(s) for s in inputs), default=0)
    if last >= limit or longest > limit:
        raise ValueError(
            f"{model.manifest.name}: positions up to {max(last, longest - 1)} exceed the "
            f"model's max_positions {limit} (positions 0 .. {limit - 1})"
        )


def _greedy_loop(
    model: OrtModel,
    logits: np.ndarray,
    positions: np.ndarray,
    cache: tuple[np.ndarray, np.ndarray],
    cross: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy steps from the first token's logits [B, V]; rows leave as they finish."""
    n = logits.shape[0]
    eos = model.ids.eos_id
    alive = np.arange(n)
    results: list[list[int]] = [[] for _ in range(n)]
    past_k, past_v = cache
    for step in range(max_new_tokens):
        chosen = np.argmax(logits, axis=-1)  # [R], ties to the lowest id
        keep = []
        for row, seq in enumerate(alive):
            token = int(chosen[row])
            if token == eos:
                continue
            results[seq].append(token)
            if step < max_new_tokens - 1:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(alive):
            rows = np.array(keep)
            alive, chosen, positions = alive[rows], chosen[rows], positions[rows]
            past_k, past_v = past_k[:, rows], past_v[:, rows]
            if cross is not None:
                cross = (cross[0][:, rows], cross[1][:, rows], cross[2][rows])
        if int(positions.max()) + 1 > past_k.shape[3]:
            capacity = bucket(int(positions.max()) + 1)
            past_k, past_v = grow_cache(past_k, capacity), grow_cache(past_v, capacity)
        out = model.step(chosen[:, None], positions, past_k, past_v, *(cross or ()))
        logits, past_k, past_v = out.logits[:, -1], out.present_k, out.present_v
        positions = positions + 1
    return results


def greedy_translate(
    model: OrtModel, sources: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Token ids (without EOS) for each source (ids ending with EOS), one batch."""
    _check_positions(model, sources, max_new_tokens - 1)
    src_ids, src_mask = pad_batch(sources, model.ids.pad_id)
    cross_k, cross_v = model.encode(src_ids, src_mask)
    n = len(sources)
    past_k, past_v = model.new_cache(n, bucket(1))
    start = np.full((n, 1), model.ids.decoder_start_id, dtype=np.int64)
    positions = np.zeros(n, dtype=np.int64)
    out = model.step(start, positions, past_k, past_v, cross_k, cross_v, src_mask)
    return _greedy_loop(
        model, out.logits[:, -1], positions + 1, (out.present_k, out.present_v),
        (cross_k, cross_v, src_mask), max_new_tokens,
    )  # fmt: skip


def greedy_generate(
    model: OrtModel, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Continue each prompt: one right-padded prefill call (T > 1), then single steps."""
    _check_positions(model, prompts, max(len(p) for p in prompts) + max_new_tokens - 2)
    ids, _ = pad_batch(prompts, model.ids.pad_id)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    past_k, past_v = model.new_cache(len(prompts), bucket(ids.shape[1] + 1))
    out = model.step(ids, np.zeros(len(prompts), dtype=np.int64), past_k, past_v)
    last = out.logits[np.arange(len(prompts)), lengths - 1]  # [B, V]
    return _greedy_loop(model, last, lengths, (out.present_k, out.present_v), None, max_new_tokens)


def teacher_forced_logits(
    model: OrtModel,
    sources: Sequence[Sequence[int]] | None,
    targets: Sequence[Sequence[int]],
) -> list[np.ndarray]:
    """Step-by-step logits [len, V] of each target (fed one token per call, batched).

    Translator: targets start with decoder_start_id. LM: targets are whole sequences.
    """
    _check_positions(model, sources or (), max(len(t) for t in targets) - 1)
    ids, _ = pad_batch(targets, model.ids.pad_id)
    n, width = ids.shape
    cross: tuple[np.ndarray, ...] = ()
    if sources is not None:
        src_ids, src_mask = pad_batch(sources, model.ids.pad_id)
        cross = (*model.encode(src_ids, src_mask), src_mask)
    past_k, past_v = model.new_cache(n, bucket(width))
    steps = []
    for t in range(width):
        out = model.step(ids[:, t : t + 1], np.full(n, t), past_k, past_v, *cross)
        past_k, past_v = out.present_k, out.present_v
        steps.append(out.logits[:, 0])
    logits = np.stack(steps, axis=1)  # [B, width, V]
    return [logits[i, : len(t)] for i, t in enumerate(targets)]


__all__ = [
    "OrtModel",
    "StepOutput",
    "bind_layers",
    "bucket",
    "cache_write_graph",
    "cache_write_indices",
    "greedy_generate",
    "greedy_translate",
    "grow_cache",
    "layer_feeds",
    "onnx_bytes",
    "pad_batch",
    "teacher_forced_logits",
    "write_cache",
]

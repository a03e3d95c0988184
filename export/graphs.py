"""nn.Module wrappers whose forward is exactly one graph of the export contract.

They reuse the model's own modules (embeddings, projections, norms, feed-forward) and only
re-express the decoder step around a fixed-capacity cache:

* The caches are inputs only, one [B, H, C, Dh] tensor per layer for keys and values (and
  [B, H, S, Dh] for the cross-attention ones): the caller keeps all layers in one
  [L, B, H, C, Dh] buffer and passes each layer's slice, so nothing is split or copied
  here. Each self-attention attends over the past cache and this step's new keys side by
  side (scores concatenated, one softmax); the new keys and values of all layers are
  returned ([L, B, H, T, Dh]) for the caller to write at slots positions[b] + t of its own
  cache, in place.
* Masks come from `positions`: query t of row b sees cache slots c < positions[b] and new
  tokens t' <= t. Slots at or beyond positions[b] hold stale values and are never seen.
* In the decoder step, queries are scaled before Q K^T (not after, as the model does) so
  fp16 scores do not overflow; in fp32 the difference is rounding. The encoder graph is
  the model's own encoder, which scales after: its fp16 parity is in docs/parity.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from export.manifest import graph_io
from transformer.config import TransformerConfig
from transformer.model import (
    Decoder,
    DecoderLayer,
    DecoderOnly,
    Embeddings,
    EncoderDecoder,
    Model,
    MultiHeadAttention,
)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, Dh] -> [B, T, H * Dh]."""
    return x.transpose(1, 2).flatten(2)


def _attend(
    attn: MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of q [B,H,T,Dh] over k, v [B,H,S,Dh]; returns out, weights."""
    scores = torch.matmul(q * (1.0 / math.sqrt(attn.head_dim)), k.transpose(-2, -1))
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v), weights


def _decoder_step(
    embed: Embeddings,
    decoder: Decoder,
    generator: nn.Module,
    input_ids: Tensor,
    positions: Tensor,
    past_k: Sequence[Tensor],
    past_v: Sequence[Tensor],
    cross_k: Sequence[Tensor] | None = None,
    cross_v: Sequence[Tensor] | None = None,
    src_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One decoder call of T new tokens per row after `positions` cached ones."""
    steps = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
    absolute = positions[:, None] + steps[None, :]  # [B, T]
    x = embed(input_ids, absolute)  # [B, T, D]
    slots = torch.arange(past_k[0].shape[2], device=input_ids.device)  # [C]
    past_mask = (slots[None, None, :] < positions[:, None, None])[:, None]  # [B, 1, 1, C]
    past_mask = past_mask.expand(-1, -1, steps.shape[0], -1)  # [B, 1, T, C]
    causal = (steps[None, :] <= steps[:, None])[None, None]  # [1, 1, T, T]
    causal = causal.expand(input_ids.shape[0], -1, -1, -1)  # [B, 1, T, T]
    self_mask = torch.cat([past_mask, causal], dim=-1)  # [B, 1, T, C + T]
    capacity = past_k[0].shape[2]
    cross_mask = None if src_mask is None else src_mask[:, None, None, :]  # [B, 1, 1, S]
    new_k: list[Tensor] = []
    new_v: list[Tensor] = []
    alignment: Tensor | None = None
    for i, module in enumerate(decoder.layers):
        layer = cast(DecoderLayer, module)
        sa = layer.self_attn
        h = layer.residual_1.inputs(x)
        q = sa.split_heads(sa.w_q(h))  # [B, H, T, Dh]
        k, v = sa.project_kv(h)  # [B, H, T, Dh]
        new_k.append(k)
        new_v.append(v)
        q = q * (1.0 / math.sqrt(sa.head_dim))
        scores = torch.cat(
            [torch.matmul(q, past_k[i].transpose(-2, -1)), torch.matmul(q, k.transpose(-2, -1))],
            dim=-1,
        )  # [B, H, T, C + T]
        scores = scores.masked_fill(~self_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights[..., :capacity], past_v[i]) + torch.matmul(
            weights[..., capacity:], v
        )  # [B, H, T, Dh]
        x = layer.residual_1.add(x, sa.w_o(_merge_heads(out)))
        if layer.cross_attn is not None and layer.residual_2 is not None:
            if cross_k is None or cross_v is None or cross_mask is None:
                raise ValueError("a translator decoder step needs cross_k, cross_v, src_mask")
            ca = layer.cross_attn
            q = ca.split_heads(ca.w_q(layer.residual_2.inputs(x)))
            out, cross_weights = _attend(ca, q, cross_k[i], cross_v[i], cross_mask)
            x = layer.residual_2.add(x, ca.w_o(_merge_heads(out)))
            alignment = cross_weights.mean(dim=1)  # [B, T, S], last layer wins
        x = layer.residual_3.add(x, layer.feed_forward(layer.residual_3.inputs(x)))
    if decoder.norm is not None:
        x = decoder.norm(x)
    logits = generator(x)  # [B, T, V]
    # The caller writes them into its cache at slots positions[b] + t: the graph never
    # copies the cache (a full copy per step cost more than attention itself at long C).
    return logits, torch.stack(new_k), torch.stack(new_v), alignment  # [L, B, H, T, Dh]


class TranslatorEncoder(nn.Module):
    """encoder.onnx: (src_ids, src_mask) -> cross_k, cross_v [L, B, H, S, Dh]."""

    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        memory, _ = self.model.encode(src_ids, src_mask)
        kv = self.model.cross_kv(memory)
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


class TranslatorDecoderStep(nn.Module):
    """Translator decoder.onnx: one step over per-layer caches [B, H, C, Dh]."""

    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, positions: Tensor, src_mask: Tensor, *layers: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """layers: past_k_0.., past_v_0.., cross_k_0.., cross_v_0.. (L of each)."""
        m = self.model
        n = len(m.decoder.layers)
        pk, pv, ck, cv = (layers[i * n : (i + 1) * n] for i in range(4))
        logits, new_k, new_v, alignment = _decoder_step(
            m.tgt_embed, m.decoder, m.generator, input_ids, positions, pk, pv, ck, cv, src_mask
        )
        assert alignment is not None
        return logits, new_k, new_v, alignment


class LanguageModelStep(nn.Module):
    """Language-model decoder.onnx: T >= 1 tokens per row (T > 1 prefills a prompt)."""

    def __init__(self, model: DecoderOnly) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, positions: Tensor, *layers: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """layers: past_k_0.., past_v_0.. (L of each)."""
        m = self.model
        n = len(m.decoder.layers)
        logits, new_k, new_v, _ = _decoder_step(
            m.embed, m.decoder, m.generator, input_ids, positions, layers[:n], layers[n:]
        )
        return logits, new_k, new_v


def task_of(config: TransformerConfig) -> str:
    return "translation" if config.arch == "encoder-decoder" else "generation"


def graph_modules(model: Model) -> dict[str, nn.Module]:
    """The contract's graphs of `model`, by graph name, in eval mode."""
    model.eval()
    if isinstance(model, EncoderDecoder):
        return {"encoder": TranslatorEncoder(model), "decoder": TranslatorDecoderStep(model)}
    return {"decoder": LanguageModelStep(model)}


# Example sizes for tracing: all different and > 1, so no axis is specialised to a
# constant or unified with another one.
_B, _S, _T, _C = 3, 7, 5, 11


def example_inputs(
    config: TransformerConfig, graph: str, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Inputs for tracing `graph`, by contract name, with valid ids and positions."""
    gen = torch.Generator().manual_seed(0)
    low = max(config.eos_id, config.bos_id, config.pad_id) + 1
    ids = torch.randint(min(low, config.vocab_size - 1), config.vocab_size, (_B, _S), generator=gen)
    cache = (config.n_decoder_layers, _B, config.n_heads, _C, config.head_dim)
    cross = (config.n_decoder_layers, _B, config.n_heads, _S, config.head_dim)
    src_mask = torch.arange(_S)[None, :] < torch.tensor([_S, _S - 2, 1])[:, None]
    if graph == "encoder":
        return {"src_ids": ids, "src_mask": src_mask}
    layers = config.n_decoder_layers
    inputs = {"input_ids": ids[:, :_T].clone(), "positions": torch.tensor([0, 2, _C - _T])}
    if config.arch == "encoder-decoder":
        inputs["src_mask"] = src_mask
    kinds = ("past_k", "past_v", "cross_k", "cross_v")
    for kind in kinds if config.arch == "encoder-decoder" else kinds[:2]:
        shape = cache if kind.startswith("past") else cross
        for i in range(layers):
            inputs[f"{kind}_{i}"] = torch.randn(shape[1:], generator=gen).to(dtype)
    return inputs


def io_names(config: TransformerConfig, graph: str) -> tuple[list[str], list[str]]:
    inputs, outputs = graph_io(
        task_of(config), graph, "fp32", config.n_decoder_layers, config.n_heads,
        config.head_dim, config.vocab_size,
    )  # fmt: skip
    return [s.name for s in inputs], [s.name for s in outputs]


def dynamic_axes(config: TransformerConfig, graph: str) -> dict[str, dict[int, str]]:
    """Named dynamic axes of every input and output (the TorchScript exporter's form)."""
    inputs, outputs = graph_io(
        task_of(config), graph, "fp32", config.n_decoder_layers, config.n_heads,
        config.head_dim, config.vocab_size,
    )  # fmt: skip
    return {
        s.name: {axis: dim for axis, dim in enumerate(s.shape) if isinstance(dim, str)}
        for s in [*inputs, *outputs]
    }


def dynamic_shapes(config: TransformerConfig, graph: str) -> dict[str, Any]:
    """The same axes as torch.export Dims (the dynamo exporter's form), inputs only, keyed
    by the forward's parameters (the per-layer caches are its `*layers`)."""
    dims = {name: torch.export.Dim(name, min=1) for name in ("B", "S", "T", "C")}
    inputs, _ = graph_io(
        task_of(config), graph, "fp32", config.n_decoder_layers, config.n_heads,
        config.head_dim, config.vocab_size,
    )  # fmt: skip
    named: dict[str, Any] = {}
    layers: list[Any] = []
    for s in inputs:
        axes = {axis: dims[dim] for axis, dim in enumerate(s.shape) if isinstance(dim, str)}
        if s.name.startswith(("past_", "cross_")) and graph == "decoder":
            layers.append(axes)
        else:
            named[s.name] = axes
    if layers:
        named["layers"] = tuple(layers)
    return named


__all__ = [
    "LanguageModelStep",
    "TranslatorDecoderStep",
    "TranslatorEncoder",
    "dynamic_axes",
    "dynamic_shapes",
    "example_inputs",
    "graph_modules",
    "io_names",
    "task_of",
]

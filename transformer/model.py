"""The Transformer of "Attention Is All You Need", written out module by module.

Shapes: B batch, H heads, T target/query length, S source/key length, D d_model,
Dh head dim, V vocabulary. Masks are boolean, True where attention is allowed, and
broadcast to [B, H, T, S]. Key/value caches are tuples (k, v) of [B, H, S, Dh].

Every forward takes explicit token positions, so a serving engine can run sequences of
different lengths in one batch, and an optional past cache, so one step of decoding costs
one token of work. Every attention module can return its weights; the stacks pass on
the encoder's self-attention and the decoder's cross-attention (the alignment the
service returns), not the decoder's self-attention.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from transformer.config import TransformerConfig

KV = tuple[Tensor, Tensor]


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V, returning the output and the attention weights.

    q: [B, H, T, Dh], k and v: [B, H, S, Dh], mask: bool broadcastable to [B, H, T, S].
    Masked scores get the dtype's lowest value rather than -inf, so a fully masked row
    (a padding query) yields finite numbers instead of NaN.
    """
    d_k = q.size(-1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)  # [B, H, T, S]
    if dropout is not None:
        weights = dropout(weights)
    return torch.matmul(weights, v), weights  # [B, H, T, Dh]


class MultiHeadAttention(nn.Module):
    """h parallel attention heads over learned projections of queries, keys and values."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        x = x.view(batch, length, self.n_heads, self.head_dim)  # [B, T, H, Dh]
        return x.transpose(1, 2)  # [B, H, T, Dh]

    def project_kv(self, source: Tensor) -> KV:
        """Keys and values of `source` [B, S, D]; the decoder caches them."""
        return self.split_heads(self.w_k(source)), self.split_heads(self.w_v(source))

    def forward(
        self,
        query: Tensor,
        source: Tensor | None = None,
        mask: Tensor | None = None,
        past: KV | None = None,
        static_kv: KV | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, KV, Tensor | None]:
        """Attend from `query` [B, T, D] to `source` (default: the query itself).

        past: cached (k, v) to which this call's keys and values are appended (self-attention
        during decoding). static_kv: precomputed (k, v) used as they are (cross-attention).
        Returns the output [B, T, D], the (k, v) attended over, and the weights if asked.
        """
        batch, length, d_model = query.shape
        q = self.split_heads(self.w_q(query))  # [B, H, T, Dh]
        if static_kv is not None:
            k, v = static_kv
        else:
            k, v = self.project_kv(query if source is None else source)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)  # [B, H, S_past + T, Dh]
                v = torch.cat([past[1], v], dim=2)
        out, weights = scaled_dot_product_attention(
            q, k, v, mask, self.dropout if self.training else None
        )
        out = out.transpose(1, 2).reshape(batch, length, d_model)  # [B, T, D]
        return self.w_o(out), (k, v), weights if need_weights else None


def activation_fn(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.SiLU()


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, applied at every position."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.w_1 = nn.Linear(config.d_model, config.d_ff)
        self.w_2 = nn.Linear(config.d_ff, config.d_model)
        self.activation = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class _Residual(nn.Module):
    """The residual wrapper: x + Dropout(sublayer(LayerNorm(x))) (pre-LN) or
    LayerNorm(x + Dropout(sublayer(x))) (post-LN, as in the paper)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def inputs(self, x: Tensor) -> Tensor:
        """What the sublayer sees."""
        return self.norm(x) if self.norm_first else x

    def add(self, x: Tensor, sublayer_out: Tensor) -> Tensor:
        """Combine the sublayer's output with the residual stream."""
        y = x + self.dropout(sublayer_out)
        return y if self.norm_first else self.norm(y)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual and a LayerNorm."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.feed_forward = FeedForward(config)
        self.residual_1 = _Residual(config)
        self.residual_2 = _Residual(config)

    def forward(
        self, x: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attn, _, weights = self.self_attn(
            self.residual_1.inputs(x), mask=mask, need_weights=need_weights
        )
        x = self.residual_1.add(x, attn)
        x = self.residual_2.add(x, self.feed_forward(self.residual_2.inputs(x)))
        return x, weights


class DecoderLayer(nn.Module):
    """Masked self-attention, optional cross-attention over the encoder, feed-forward."""

    def __init__(self, config: TransformerConfig, cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.residual_1 = _Residual(config)
        self.cross_attn = (
            MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
            if cross_attention
            else None
        )
        self.residual_2 = _Residual(config) if cross_attention else None
        self.feed_forward = FeedForward(config)
        self.residual_3 = _Residual(config)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        past: KV | None = None,
        cross_kv: KV | None = None,
        cross_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, KV, Tensor | None]:
        """x [B, T, D] -> (x [B, T, D], self-attention (k, v) incl. past, cross weights)."""
        attn, present, _ = self.self_attn(self.residual_1.inputs(x), mask=self_mask, past=past)
        x = self.residual_1.add(x, attn)
        cross_weights = None
        if self.cross_attn is not None and self.residual_2 is not None:
            if cross_kv is None:
                raise ValueError("a decoder layer with cross-attention needs cross_kv")
            attn, _, cross_weights = self.cross_attn(
                self.residual_2.inputs(x),
                mask=cross_mask,
                static_kv=cross_kv,
                need_weights=need_weights,
            )
            x = self.residual_2.add(x, attn)
        x = self.residual_3.add(x, self.feed_forward(self.residual_3.inputs(x)))
        return x, present, cross_weights


def sinusoidal_table(max_positions: int, d_model: int) -> Tensor:
    """PE(pos, i) = sin(pos / 10000^(2i/d)) in the first half, cos(...) in the second.

    The paper interleaves sin and cos; Marian concatenates them. The two differ only by a
    fixed permutation of channels, and we use Marian's layout so its checkpoints load as-is.
    """
    position = torch.arange(max_positions, dtype=torch.float64)[:, None]  # [P, 1]
    i = torch.arange(d_model // 2, dtype=torch.float64)[None, :]  # [1, D/2]
    angle = position / torch.pow(10000.0, 2 * i / d_model)  # [P, D/2]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()  # [P, D]


class Embeddings(nn.Module):
    """Token embedding (optionally times sqrt(d_model)) plus a position encoding."""

    sinusoid: Tensor  # buffer [P, D], registered only for sinusoidal positions

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
        self.position: nn.Embedding | None = None
        if config.positional == "learned":
            self.position = nn.Embedding(config.max_positions, config.d_model)
        else:
            table = sinusoidal_table(config.max_positions, config.d_model)
            self.register_buffer("sinusoid", table, persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        """ids, positions: [B, T] -> [B, T, D]."""
        x = self.token(ids) * self.scale
        if self.position is not None:
            x = x + self.position(positions)
        else:
            # A table lookup, as an embedding's: it exports as Gather. Indexing exports as
            # GatherND, which onnxruntime's CUDA kernel fed from a host buffer a captured
            # CUDA graph re-reads after it is gone (fixed by onnxruntime PR #32120).
            x = x + F.embedding(positions, self.sinusoid)
        return self.dropout(x)


def causal_mask(query_len: int, key_len: int, device: torch.device) -> Tensor:
    """[T, S] bool: query i (the last T of S positions) sees keys 0 .. S - T + i."""
    ones = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal=key_len - query_len)


def default_positions(ids: Tensor, past_len: int) -> Tensor:
    """Positions past_len .. past_len + T - 1 for every row: [B, T]."""
    length = ids.size(1)
    positions = torch.arange(past_len, past_len + length, device=ids.device)
    return positions.unsqueeze(0).expand(ids.size(0), length)


class DecoderOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    past: list[KV]  # per layer (k, v), each [B, H, S_past + T, Dh]
    cross_attention: list[Tensor] | None  # per layer [B, H, T, S], when asked


class Encoder(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.final_norm else None
        )

    def forward(
        self, x: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        weights = []
        for layer in self.layers:
            x, w = layer(x, mask, need_weights)
            if w is not None:
                weights.append(w)
        return (self.norm(x) if self.norm is not None else x), weights


class Decoder(nn.Module):
    def __init__(self, config: TransformerConfig, cross_attention: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(config, cross_attention) for _ in range(config.n_decoder_layers)
        )
        self.norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.final_norm else None
        )

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor,
        past: list[KV] | None = None,
        cross_kv: list[KV] | None = None,
        cross_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[KV], list[Tensor] | None]:
        presents: list[KV] = []
        cross_weights: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, present, w = layer(
                x,
                self_mask,
                past[i] if past is not None else None,
                cross_kv[i] if cross_kv is not None else None,
                cross_mask,
                need_weights,
            )
            presents.append(present)
            if w is not None:
                cross_weights.append(w)
        x = self.norm(x) if self.norm is not None else x
        return x, presents, (cross_weights if need_weights and cross_kv is not None else None)


class _LanguageModelHead(nn.Module):
    """Projects decoder states to vocabulary logits, tied to the embedding when asked."""

    def __init__(self, config: TransformerConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_output:
            self.proj.weight = embedding.weight
        self.final_logits_bias: Tensor | None = None
        if config.final_logits_bias:
            self.final_logits_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.proj(x)  # [B, T, V]
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits


def _self_attention_mask(
    query_len: int, key_len: int, key_mask: Tensor | None, device: torch.device
) -> Tensor:
    """Causal mask [1, 1, T, S], combined with a key-padding mask [B, S] when given."""
    mask = causal_mask(query_len, key_len, device)[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]  # [B, 1, T, S]
    return mask


def _init_weights(module: nn.Module, config: TransformerConfig) -> None:
    for name, param in module.named_parameters():
        if param.dim() > 1 and "token" not in name and "position" not in name:
            nn.init.xavier_uniform_(param)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            std = config.d_model**-0.5 if config.scale_embeddings else 0.02
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()


class EncoderDecoder(nn.Module):
    """The translation model: an encoder stack, a decoder stack and a tied generator."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if config.arch != "encoder-decoder":
            raise ValueError(f"EncoderDecoder needs arch='encoder-decoder', got {config.arch!r}")
        self.config = config
        self.src_embed = Embeddings(config)
        self.tgt_embed = self.src_embed if config.share_embeddings else Embeddings(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, cross_attention=True)
        self.generator = _LanguageModelHead(config, self.tgt_embed.token)
        _init_weights(self, config)

    def source_mask(self, src_ids: Tensor) -> Tensor:
        """[B, S] bool, True on real (non-pad) source tokens."""
        return src_ids != self.config.pad_id

    def encode(
        self, src_ids: Tensor, src_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """src_ids [B, S] -> memory [B, S, D] (and per-layer self-attention weights)."""
        if src_mask is None:
            src_mask = self.source_mask(src_ids)
        x = self.src_embed(src_ids, default_positions(src_ids, 0))
        return self.encoder(x, src_mask[:, None, None, :], need_weights)

    def cross_kv(self, memory: Tensor) -> list[KV]:
        """Per decoder layer, the cross-attention keys and values of the memory (once)."""
        return [
            layer.cross_attn.project_kv(memory)  # type: ignore[union-attr,operator]
            for layer in self.decoder.layers
        ]

    def decode(
        self,
        tgt_ids: Tensor,
        cross_kv: list[KV],
        src_mask: Tensor,
        positions: Tensor | None = None,
        past: list[KV] | None = None,
        tgt_key_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> DecoderOutput:
        """Run the decoder on tgt_ids [B, T] after `past`, attending to the encoded source.

        src_mask: [B, S] real source tokens. tgt_key_mask: [B, S_past + T] real target
        tokens (None: all real). positions: [B, T] (default: continue after past).
        """
        past_len = past[0][0].size(2) if past else 0
        if positions is None:
            positions = default_positions(tgt_ids, past_len)
        x = self.tgt_embed(tgt_ids, positions)
        self_mask = _self_attention_mask(
            tgt_ids.size(1), past_len + tgt_ids.size(1), tgt_key_mask, tgt_ids.device
        )
        x, present, cross = self.decoder(
            x, self_mask, past, cross_kv, src_mask[:, None, None, :], need_weights
        )
        return DecoderOutput(self.generator(x), present, cross)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        """Teacher forcing: logits [B, T, V] for every target prefix."""
        src_mask = self.source_mask(src_ids)
        memory, _ = self.encode(src_ids, src_mask)
        return self.decode(tgt_ids, self.cross_kv(memory), src_mask).logits


class DecoderOnly(nn.Module):
    """The generation model: a causal decoder stack (no cross-attention) and a generator."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if config.arch != "decoder-only":
            raise ValueError(f"DecoderOnly needs arch='decoder-only', got {config.arch!r}")
        self.config = config
        self.embed = Embeddings(config)
        self.decoder = Decoder(config, cross_attention=False)
        self.generator = _LanguageModelHead(config, self.embed.token)
        _init_weights(self, config)

    def decode(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        past: list[KV] | None = None,
        key_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """ids [B, T] after `past`; key_mask [B, S_past + T] marks real tokens."""
        past_len = past[0][0].size(2) if past else 0
        if positions is None:
            positions = default_positions(ids, past_len)
        x = self.embed(ids, positions)
        mask = _self_attention_mask(ids.size(1), past_len + ids.size(1), key_mask, ids.device)
        x, present, _ = self.decoder(x, mask, past)
        return DecoderOutput(self.generator(x), present, None)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits [B, T, V] predicting each next token."""
        return self.decode(ids).logits


Model = EncoderDecoder | DecoderOnly


def build_model(config: TransformerConfig) -> Model:
    """The model class the config's architecture names."""
    if config.arch == "encoder-decoder":
        return EncoderDecoder(config)
    return DecoderOnly(config)


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (tied matrices counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "KV",
    "DecoderOnly",
    "DecoderOutput",
    "EncoderDecoder",
    "Model",
    "MultiHeadAttention",
    "build_model",
    "causal_mask",
    "count_parameters",
    "scaled_dot_product_attention",
    "sinusoidal_table",
]

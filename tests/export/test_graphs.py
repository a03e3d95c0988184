"""The graph wrappers in PyTorch: step by step over the fixed-capacity cache they must equal
the model's own decode with its growing cache (before any ONNX is involved)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from export.graphs import graph_modules
from export.testing import tiny_config
from transformer.model import DecoderOnly, EncoderDecoder, build_model

VARIANTS = [
    dict(norm_first=True, final_norm=True, positional="learned"),
    dict(norm_first=False, final_norm=False, positional="sinusoidal", final_logits_bias=True),
]


def _model(arch: str, **overrides: Any) -> Any:
    torch.manual_seed(0)
    return build_model(tiny_config(arch, vocab_size=50, **overrides)).eval()


def _cache(model: Any, batch: int, capacity: int, fill: float = 0.0) -> tuple[Any, Any]:
    c = model.config
    shape = (c.n_decoder_layers, batch, c.n_heads, capacity, c.head_dim)
    return torch.full(shape, fill), torch.full(shape, fill)


def _write(cache: Any, new: Any, positions: Any) -> Any:
    """The caller's side of the contract: new [L, B, H, T, Dh] at slots positions[b] + t."""
    assert new.shape[:3] == cache.shape[:3] and new.shape[4] == cache.shape[4]
    out = cache.clone()
    for b in range(new.shape[1]):
        p = int(positions[b])
        out[:, b, :, p : p + new.shape[3]] = new[:, b]
    return out


def _step(graph: Any, ids: Any, positions: Any, past_k: Any, past_v: Any, *cross: Any) -> Any:
    """One decoder call, its new keys and values written into the cache: (logits, k, v, ...)."""
    if cross:  # translator: (cross_k, cross_v, src_mask), caches passed layer by layer
        cross_k, cross_v, src_mask = cross
        outputs = graph(ids, positions, src_mask, *past_k, *past_v, *cross_k, *cross_v)
    else:
        outputs = graph(ids, positions, *past_k, *past_v)
    logits, new_k, new_v, *rest = outputs
    return (logits, _write(past_k, new_k, positions), _write(past_v, new_v, positions), *rest)


@pytest.mark.parametrize("overrides", VARIANTS)
@torch.no_grad()
def test_translator_step_equals_model_decode(overrides: dict[str, Any]) -> None:
    model: EncoderDecoder = _model("encoder-decoder", **overrides)
    graphs = graph_modules(model)
    src = torch.randint(4, 50, (2, 6))
    src_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    cross_k, cross_v = graphs["encoder"](src, src_mask)
    memory, _ = model.encode(src, src_mask)
    kv = model.cross_kv(memory)
    assert torch.allclose(cross_k, torch.stack([k for k, _ in kv]))
    tgt = torch.randint(4, 50, (2, 7))
    expected = model.decode(tgt, kv, src_mask, need_weights=True)
    past_k, past_v = _cache(model, 2, 12, fill=123.0)  # stale slots must not be seen
    for t in range(7):
        logits, past_k, past_v, align = _step(
            graphs["decoder"],
            tgt[:, t : t + 1], torch.full((2,), t), past_k, past_v, cross_k, cross_v, src_mask,
        )  # fmt: skip
        assert torch.allclose(logits[:, 0], expected.logits[:, t], atol=1e-5)
        want_align = expected.cross_attention[-1][:, :, t].mean(dim=1)  # type: ignore[index]
        assert torch.allclose(align[:, 0], want_align, atol=1e-6)
    for layer, (k, v) in enumerate(expected.past):
        assert torch.allclose(past_k[layer, :, :, :7], k, atol=1e-6)
        assert torch.allclose(past_v[layer, :, :, :7], v, atol=1e-6)
    assert (past_k[:, :, :, 7:] == 123.0).all()  # beyond the tokens: untouched


@pytest.mark.parametrize("overrides", VARIANTS)
@torch.no_grad()
def test_lm_prefill_then_steps_equal_model_decode(overrides: dict[str, Any]) -> None:
    model: DecoderOnly = _model("decoder-only", **overrides)
    step = graph_modules(model)["decoder"]
    ids = torch.randint(4, 50, (3, 9))
    expected = model.decode(ids).logits
    past_k, past_v = _cache(model, 3, 16, fill=7.0)  # stale values from an earlier user
    logits, past_k, past_v = _step(
        step, ids[:, :4], torch.zeros(3, dtype=torch.long), past_k, past_v
    )
    assert torch.allclose(logits, expected[:, :4], atol=1e-5)
    for t in range(4, 9):
        logits, past_k, past_v = _step(step, ids[:, t : t + 1], torch.full((3,), t), past_k, past_v)
        assert torch.allclose(logits[:, 0], expected[:, t], atol=1e-5)


@torch.no_grad()
def test_right_padded_prefill_rows_equal_alone() -> None:
    """Row 1's prompt is shorter: its padding writes beyond its length and is overwritten."""
    model: DecoderOnly = _model("decoder-only")
    step = graph_modules(model)["decoder"]
    prompts = [[2, 5, 6, 7, 8], [2, 9, 10]]
    batch = torch.tensor([prompts[0], [*prompts[1], 0, 0]])
    past = _cache(model, 2, 8)
    logits, k, v = _step(step, batch, torch.zeros(2, dtype=torch.long), *past)
    nxt, _, _ = _step(step, torch.tensor([[11], [12]]), torch.tensor([5, 3]), k, v)
    for row, prompt in enumerate(prompts):
        alone = model.decode(torch.tensor([[*prompt, 11 + row]])).logits[0]
        assert torch.allclose(logits[row, len(prompt) - 1], alone[len(prompt) - 1], atol=1e-5)
        assert torch.allclose(nxt[row, 0], alone[-1], atol=1e-5)

"""The model's invariants: attention maths, masking, padding, caching, configs, checkpoints.

Why: the decoder, the ONNX export and the server all assume these hold; a break here shows
up elsewhere only as slightly wrong translations.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from transformer.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from transformer.config import ConfigError, TransformerConfig
from transformer.model import (
    DecoderOnly,
    EncoderDecoder,
    MultiHeadAttention,
    build_model,
    scaled_dot_product_attention,
)

ATOL = 1e-5


def tiny_config(arch: str = "encoder-decoder", **overrides: Any) -> TransformerConfig:
    fields: dict[str, Any] = dict(
        arch=arch,
        vocab_size=24,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_positions=64,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def tiny_translator(seed: int = 0, **overrides: Any) -> EncoderDecoder:
    torch.manual_seed(seed)
    return EncoderDecoder(tiny_config("encoder-decoder", **overrides)).eval()


def tiny_lm(seed: int = 0, **overrides: Any) -> DecoderOnly:
    torch.manual_seed(seed)
    return DecoderOnly(tiny_config("decoder-only", **overrides)).eval()


def random_ids(batch: int, length: int, seed: int, low: int = 4, high: int = 24) -> torch.Tensor:
    """Ids that avoid the special tokens (pad/unk/bos/eos are 0..3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=g)


# --- attention ------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_torch(with_mask: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k = torch.randn(2, 3, 7, 8, generator=g)
    v = torch.randn(2, 3, 7, 8, generator=g)
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, 5, 7, generator=g) > 0.4
        mask[..., 0] = True  # no fully masked row: torch gives NaN there, we do not
    ours, weights = scaled_dot_product_attention(q, k, v, mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert weights.shape == (2, 3, 5, 7)
    if mask is not None:
        assert torch.all(weights.masked_select(~mask.expand_as(weights)) == 0)


def test_multi_head_attention_weights() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    query, source = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    out, (k, v), weights = mha(query, source, need_weights=True)
    assert out.shape == (2, 3, 16) and k.shape == v.shape == (2, 4, 5, 4)
    assert weights is not None and weights.shape == (2, 4, 3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3))
    assert mha(query, source)[2] is None


# --- padding and causality ------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [True, False])
def test_translator_padding_does_not_change_a_sequence(norm_first: bool) -> None:
    model = tiny_translator(norm_first=norm_first, final_norm=norm_first)
    pad = model.config.pad_id
    src_alone = random_ids(1, 4, seed=1)
    tgt = random_ids(1, 5, seed=2)
    src = torch.full((3, 9), pad)
    src[0, :4] = src_alone[0]
    src[1:] = random_ids(2, 9, seed=3)
    src[2, 6:] = pad  # the others: one longer, one padded differently
    tgts = torch.cat([tgt, random_ids(2, 5, seed=4)])
    with torch.inference_mode():
        mem_alone, _ = model.encode(src_alone)
        mem_batch, _ = model.encode(src)
        torch.testing.assert_close(mem_batch[:1, :4], mem_alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(src, tgts)[:1], model(src_alone, tgt), atol=ATOL, rtol=0)


def test_lm_left_padding_does_not_change_a_sequence() -> None:
    model = tiny_lm(positional="learned")
    pad = model.config.pad_id
    alone = random_ids(1, 4, seed=1)
    ids = random_ids(3, 7, seed=2)
    ids[0, :3] = pad
    ids[0, 3:] = alone[0]
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[0, :3] = False
    positions = torch.arange(7).expand(3, 7).clone()
    positions[0] = (torch.arange(7) - 3).clamp(min=0)
    with torch.inference_mode():
        batch = model.decode(ids, positions, key_mask=key_mask).logits
        torch.testing.assert_close(batch[:1, 3:], model(alone), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
def test_causal_mask_hides_the_future(arch: str) -> None:
    model = build_model(tiny_config(arch)).eval()
    src = random_ids(2, 6, seed=1)
    ids = random_ids(2, 8, seed=2)
    t = 4
    changed = ids.clone()
    changed[:, t + 1 :] = random_ids(2, 8 - t - 1, seed=3)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(src, x) if isinstance(model, EncoderDecoder) else model(x)

    with torch.inference_mode():
        before, after = logits(ids), logits(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=ATOL, rtol=0)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


# --- KV cache -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_decoding_equals_full(
    arch: str, norm_first: bool, positional: str, chunk: int
) -> None:
    torch.manual_seed(0)
    config = tiny_config(arch, norm_first=norm_first, final_norm=norm_first, positional=positional)
    model = build_model(config).eval()
    src = random_ids(2, 5, seed=1)
    ids = random_ids(2, 7, seed=2)
    with torch.inference_mode():
        if isinstance(model, EncoderDecoder):
            src_mask = model.source_mask(src)
            cross = model.cross_kv(model.encode(src, src_mask)[0])
            full = model.decode(ids, cross, src_mask).logits
        else:
            full = model.decode(ids).logits
        past = None
        pieces = []
        for start in range(0, ids.size(1), chunk):
            piece = ids[:, start : start + chunk]
            if isinstance(model, EncoderDecoder):
                out = model.decode(piece, cross, src_mask, past=past)
            else:
                out = model.decode(piece, past=past)
            past = out.past
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    assert past is not None and past[0][0].shape == (2, config.n_heads, 7, config.head_dim)


# --- configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(d_model=32, n_heads=3), ["n_heads", "3", "32"]),
        (dict(vocab_size=-5), ["vocab_size", "-5"]),
        (dict(d_ff=0), ["d_ff"]),
        (dict(activation="swish"), ["activation", "swish"]),
        (dict(n_encoder_layers=0), ["n_encoder_layers"]),
        (dict(dropout=1.0), ["dropout"]),
        (dict(eos_id=99), ["eos_id", "99"]),
    ],
)
def test_bad_config_is_explained(overrides: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(**overrides)
    for word in words:
        assert word in str(info.value)


def test_unknown_config_field_is_named() -> None:
    data = tiny_config().to_dict() | {"d_modle": 64}
    with pytest.raises(ConfigError, match="d_modle"):
        TransformerConfig.from_dict(data)


def test_decoder_only_needs_no_encoder_layers() -> None:
    assert tiny_config("decoder-only", n_encoder_layers=0).n_encoder_layers == 0


def test_config_json_round_trip(tmp_path: Path) -> None:
    config = tiny_config("decoder-only", activation="gelu_tanh", positional="learned")
    assert TransformerConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert TransformerConfig.load(tmp_path / "config.json") == config


# --- checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["encoder-decoder", "decoder-only"])
def test_checkpoint_round_trip_fp32(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, final_logits_bias=True))
    with torch.no_grad():
        assert model.generator.final_logits_bias is not None
        model.generator.final_logits_bias.normal_()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == model.config and not loaded.training
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    # The tie survives loading: one matrix, not two equal copies.
    embedding = loaded.embed if isinstance(loaded, DecoderOnly) else loaded.tgt_embed
    assert loaded.generator.proj.weight is embedding.token.weight


def test_checkpoint_stores_tied_weights_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config())  # shared src/tgt embedding, tied output
    save_checkpoint(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    tied = {"src_embed.token.weight", "tgt_embed.token.weight", "generator.proj.weight"}
    assert len(keys & tied) == 1
    distinct = {id(p) for p in model.parameters()}
    assert len(keys) == len(distinct)


def test_checkpoint_round_trip_fp16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    save_checkpoint(model, tmp_path, dtype=torch.float16)
    loaded = load_checkpoint(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=2e-3, rtol=1e-3)
    src, tgt = random_ids(2, 5, seed=1), random_ids(2, 4, seed=2)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(src, tgt), model(src, tgt), atol=5e-2, rtol=1e-2)


def test_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(build_model(tiny_config()), tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load_checkpoint(tmp_path)


def test_checkpoint_config_mismatch(tmp_path: Path) -> None:
    save_checkpoint(build_model(tiny_config()), tmp_path)
    replace(tiny_config(), n_decoder_layers=3).save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path)

"""Tiny random checkpoints for tests (ours and service/'s): a real SentencePiece tokenizer
and a randomly initialised model small enough to export in about a second."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from transformer.checkpoint import TOKENIZER, save_checkpoint
from transformer.config import TransformerConfig
from transformer.model import build_model

_WORDS = [
    "in",
    "the",
    "beginning",
    "god",
    "created",
    "heaven",
    "and",
    "earth",
    "light",
    "darkness",
    "day",
    "night",
    "water",
    "land",
    "en",
    "el",
    "principio",
    "creo",
    "dios",
    "los",
    "cielos",
    "y",
    "la",
    "tierra",
    "luz",
    "tinieblas",
    "dia",
    "noche",
    "agua",
]


def tiny_tokenizer(
    path: str | Path, vocab_size: int = 96, seed: int = 0, lines: Sequence[str] = ()
) -> int:
    """Train a SentencePiece model (pad 0, unk 1, bos 2, eos 3) at `path` on `lines`
    (default: random sentences of a small en/es word list); its size."""
    if not lines:
        rng = random.Random(seed)
        lines = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)
        ]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    Path(path).write_bytes(buffer.getvalue())
    return int(spm.SentencePieceProcessor(model_file=str(path)).get_piece_size())


def tiny_config(arch: str = "encoder-decoder", **overrides: Any) -> TransformerConfig:
    """d_model 32, 4 heads, 2 layers: exports in about a second, runs in milliseconds."""
    base = TransformerConfig(
        arch=arch,  # type: ignore[arg-type]
        vocab_size=96,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2 if arch == "encoder-decoder" else 0,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_positions=64,
    )
    return replace(base, **overrides)


def make_tiny_checkpoint(
    directory: str | Path,
    arch: str = "encoder-decoder",
    seed: int = 0,
    eos_bias: float = 0.0,
    *,
    vocab_size: int = 96,
    lines: Sequence[str] = (),
    sharpen: float = 2.0,
    output_std: float | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """Write model.safetensors, config.json and tokenizer.model of a random tiny model:
    the one builder of every test suite's tiny checkpoints.

    The tokenizer is trained on `lines` (see `tiny_tokenizer`); `overrides` change
    `tiny_config`'s fields. The logits are sharpened (weight matrices scaled by `sharpen`)
    so greedy decoding does not hinge on near-ties that float rounding could flip;
    `output_std` redraws the output projection with that spread instead, so outputs vary
    from token to token; `eos_bias` (with final_logits_bias=True) makes some outputs end
    with EOS so both finish reasons occur.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_tokenizer(out / TOKENIZER, vocab_size, seed, lines)
    config = tiny_config(arch, vocab_size=vocab, **overrides)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        if sharpen != 1.0:
            for param in model.parameters():
                if param.dim() > 1:
                    param.mul_(sharpen)
        if output_std is not None:
            torch.nn.init.normal_(model.generator.proj.weight, std=output_std)
        bias = model.generator.final_logits_bias
        if eos_bias and bias is None:
            raise ValueError("eos_bias needs final_logits_bias=True")
        if bias is not None:
            bias[config.eos_id] = eos_bias
    save_checkpoint(model, out)
    return config


__all__ = ["make_tiny_checkpoint", "tiny_config", "tiny_tokenizer"]

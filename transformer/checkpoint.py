"""Checkpoints: safetensors weights + config JSON + SentencePiece model, never pickle.

A checkpoint directory holds:
  model.safetensors  weights (fp32 or fp16; tied matrices stored once)
  config.json        the TransformerConfig
  tokenizer.model    the SentencePiece model the ids belong to
  training.json      optional: how it was trained (steps, wall time, data, hardware)
  trainer_state.safetensors / trainer_state.json  optional: optimizer state for resume
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from transformer.config import TransformerConfig
from transformer.model import Model, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
TRAINING = "training.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing a file or does not match its config."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    model: Model,
    directory: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write model weights (in `dtype`), config, tokenizer and training facts."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    save_model(to_save, str(out / WEIGHTS), metadata={"format": "pt", "dtype": str(dtype)})
    model.config.save(out / CONFIG)
    if tokenizer is not None and Path(tokenizer).resolve() != (out / TOKENIZER).resolve():
        shutil.copyfile(tokenizer, out / TOKENIZER)
    if training is not None:
        (out / TRAINING).write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    return out


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Model:
    """Rebuild the model from config.json and load its weights as fp32 (eval mode)."""
    path = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}")
    config = TransformerConfig.load(path / CONFIG)
    model = build_model(config)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {path / WEIGHTS}: {error}") from error
    except RuntimeError as error:  # load_state_dict: a tensor of another shape than config's
        lines = [line.strip() for line in str(error).splitlines()]
        shape = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise CheckpointError(
            f"weights in {path / WEIGHTS} do not match config.json: {shape}"
        ) from error
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {path / WEIGHTS} do not match config.json: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.float().to(device).eval()


def tokenizer_path(directory: str | Path) -> Path:
    path = Path(directory) / TOKENIZER
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {TOKENIZER}")
    return path

"""Tiny random checkpoints exported once per session (TorchScript exporter: ~1 s each;
one with the dynamo exporter `make export` uses, ~12 s)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from export.manifest import Manifest
from export.onnx_export import export_checkpoint
from export.testing import make_tiny_checkpoint
from transformer.checkpoint import load_checkpoint
from transformer.model import Model

# name -> (arch, variants, config overrides). Together they cover pre-/post-LN,
# sinusoidal/learned positions, tied/untied outputs and a final logits bias.
KINDS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "translator-post": (
        "encoder-decoder",
        ("fp32", "fp16", "int8"),
        dict(norm_first=False, final_norm=False, positional="sinusoidal",
             final_logits_bias=True, eos_bias=1.0),
    ),
    "translator-pre": (
        "encoder-decoder",
        ("fp32",),
        dict(norm_first=True, final_norm=True, positional="learned", activation="gelu",
             share_embeddings=False, tie_output=False),
    ),
    "lm-pre": (
        "decoder-only",
        ("fp32", "int8"),
        dict(norm_first=True, final_norm=True, positional="learned", activation="gelu_tanh",
             final_logits_bias=True, eos_bias=2.0),
    ),
    "lm-post": (
        "decoder-only",
        ("fp32",),
        dict(norm_first=False, final_norm=False, positional="sinusoidal", tie_output=False),
    ),
    # translator-post as `make export` builds it (the default exporter)
    "translator-dynamo": (
        "encoder-decoder",
        ("fp32",),
        dict(norm_first=False, final_norm=False, positional="sinusoidal",
             final_logits_bias=True, eos_bias=1.0),
    ),
}  # fmt: skip
EXPORTER = {"translator-dynamo": "dynamo"}  # the others: torchscript


@dataclass
class Exported:
    """A tiny checkpoint, its PyTorch model and its exported version folder."""

    kind: str
    checkpoint: Path
    version_dir: Path
    manifest: Manifest
    model: Model


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """exported(kind) -> Exported, built on first use and shared by the session."""
    cache: dict[str, Exported] = {}
    root = tmp_path_factory.mktemp("models")

    def get(kind: str) -> Exported:
        if kind not in cache:
            arch, variants, overrides = KINDS[kind]
            name = "en-es" if arch == "encoder-decoder" else "en-lm"
            model_dir = root / kind / name
            make_tiny_checkpoint(model_dir / "checkpoint", arch, seed=1, **overrides)
            manifest = export_checkpoint(
                model_dir / "checkpoint",
                model_dir / "1",
                variants,
                exporter=EXPORTER.get(kind, "torchscript"),  # type: ignore[arg-type]
            )
            cache[kind] = Exported(
                kind, model_dir / "checkpoint", model_dir / "1", manifest,
                load_checkpoint(model_dir / "checkpoint"),
            )  # fmt: skip
        return cache[kind]

    return get


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One torch thread: on a shared 2-core machine OpenMP spinning makes tiny models slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The default exporter (torch.onnx dynamo) produces graphs equivalent to the TorchScript
path the other tests use for speed. Slow: the dynamo exporter takes 10-60 s per graph on a
busy 2-core machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.onnx_export import export_checkpoint
from export.runtime import OrtModel, greedy_generate, greedy_translate, teacher_forced_logits


@pytest.mark.slow
def test_dynamo_export_matches_torchscript_export(exported, tmp_path: Path) -> None:
    e = exported("translator-post")
    manifest = export_checkpoint(
        e.checkpoint, tmp_path / "en-es" / "1", ["fp32", "fp16"], exporter="dynamo"
    )
    assert manifest.tools["exporter"] == "torch.onnx dynamo"
    sources = [[5, 6, 7, 3], [8, 9, 10, 11, 12, 13, 3], [14, 3]]
    targets = [[2, 20, 21, 22], [2, 23], [2, 24, 25, 26, 27, 28]]
    for variant, tolerance in (("fp32", 1e-5), ("fp16", 2e-2)):
        dynamo = OrtModel(tmp_path / "en-es" / "1", variant, threads=1)
        script = OrtModel(e.version_dir, variant, threads=1)
        for a, b in zip(
            teacher_forced_logits(dynamo, sources, targets),
            teacher_forced_logits(script, sources, targets),
            strict=True,
        ):
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=tolerance)
        if variant == "fp32":
            assert greedy_translate(dynamo, sources, 12) == greedy_translate(script, sources, 12)


@pytest.mark.slow
def test_dynamo_language_model(exported, tmp_path: Path) -> None:
    e = exported("lm-pre")
    export_checkpoint(e.checkpoint, tmp_path / "en-lm" / "1", ["int8"], exporter="dynamo")
    prompts = [[2, 5, 6, 7], [2], [2, 8, 9]]
    dynamo = OrtModel(tmp_path / "en-lm" / "1", "int8", threads=1)
    script = OrtModel(e.version_dir, "int8", threads=1)
    assert greedy_generate(dynamo, prompts, 10) == greedy_generate(script, prompts, 10)

"""The command lines: python -m export (skip when up to date), export.parity, gpu_check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from export.__main__ import app as export_app
from export.gpu_check import app as gpu_app
from export.manifest import load_manifest
from export.onnx_export import ExportError, export_checkpoint
from export.parity import app as parity_app
from export.parity import check_model, render_report
from tests.fixtures import VERSES

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.mark.parametrize("app", [export_app, parity_app, gpu_app])
def test_help(app) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "--version" in result.output or "--version-dir" in result.output


def test_export_skips_when_up_to_date_and_force_rebuilds(exported, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(exported("lm-post").checkpoint, repo / "en-lm" / "checkpoint")
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    first = runner.invoke(export_app, args)
    assert first.exit_code == 0, first.output
    assert "exported" in first.output
    manifest = load_manifest(repo / "en-lm" / "1")
    assert (manifest.task, manifest.source_language) == ("generation", "en")
    second = runner.invoke(export_app, args)
    assert "up to date" in second.output
    assert load_manifest(repo / "en-lm" / "1").created_at == manifest.created_at
    forced = runner.invoke(export_app, [*args, "--force", "--version", "2"])
    assert forced.exit_code == 0 and "exported" in forced.output
    assert load_manifest(repo / "en-lm" / "2").version == 2
    # A new checkpoint (here: a changed export.json) makes version 1 out of date.
    (repo / "en-lm" / "export.json").write_text(json.dumps({"limits": {"max_new_tokens": 8}}))
    third = runner.invoke(export_app, args)
    assert "exported" in third.output
    assert load_manifest(repo / "en-lm" / "1").limits.max_new_tokens == 8
    assert not [p for p in (repo / "en-lm").iterdir() if p.name.startswith(".")]


def test_export_unknown_name_fails_clearly(tmp_path: Path) -> None:
    result = runner.invoke(export_app, ["--repository", str(tmp_path), "--name", "xx-yy"])
    assert result.exit_code != 0
    assert "no checkpoint for ['xx-yy']" in result.output


def test_languages_from_export_json_or_failing(exported, tmp_path: Path) -> None:
    checkpoint = tmp_path / "bible" / "checkpoint"
    shutil.copytree(exported("lm-post").checkpoint, checkpoint)
    with pytest.raises(ExportError, match="cannot tell the languages"):
        export_checkpoint(checkpoint, tmp_path / "bible" / "1", ["fp32"], exporter="torchscript")
    assert not (tmp_path / "bible" / "1").exists()
    (checkpoint / "export.json").write_text(json.dumps({"source_language": "la"}))
    manifest = export_checkpoint(
        checkpoint, tmp_path / "bible" / "1", ["fp32"], exporter="torchscript"
    )
    assert (manifest.name, manifest.source_language, manifest.target_language) == (
        "bible",
        "la",
        "la",
    )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU is present"
)
def test_gpu_check_without_cuda_says_what_is_missing(exported) -> None:
    e = exported("translator-post")
    result = runner.invoke(gpu_app, ["--version-dir", str(e.version_dir)])
    assert result.exit_code == 2
    assert "CUDAExecutionProvider" in result.output and "onnxruntime-gpu" in result.output


@pytest.mark.parametrize("kind", ["translator-post", "lm-pre"])
def test_gpu_check_iobinding_path_on_cpu(exported, kind: str) -> None:
    """The double-buffered IOBinding loop, run on the CPU: same tokens as export.runtime."""
    e = exported(kind)
    result = runner.invoke(
        gpu_app,
        ["--version-dir", str(e.version_dir), "--device", "cpu", "--variants", "fp32,int8",
         "--verses", "6", "--batches", "2", "--steps", "2", "--max-new-tokens", "12"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| fp32 | 0.00e+00 | 6/6 |" in result.output


def test_parity_report_on_fixture_verses(exported, tmp_path: Path) -> None:
    e = exported("translator-post")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(VERSES, data / "pairs.test.tsv")
    manifest, rows, baseline = check_model(
        e.version_dir, e.checkpoint, data, verses=12, logit_verses=4, variants=None,
        batch_size=8, max_new_tokens=16, threads=1, log=False,
    )  # fmt: skip
    by_variant = {r.variant: r for r in rows}
    assert by_variant["fp32"].greedy_identical == 12 and not by_variant["fp32"].failures
    assert by_variant["fp32"].logits_error is not None and by_variant["fp32"].logits_error < 1e-3
    assert by_variant["int8"].bleu is not None and "bleu" in baseline
    report = render_report([(manifest, rows, baseline)], "python -m export.parity")
    assert "| en-es | 1 | fp32 |" in report and "Machine:" in report

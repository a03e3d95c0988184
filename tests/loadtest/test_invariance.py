"""python -m loadtest.invariance: answers alone vs batched, on the tiny test models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loadtest.invariance import app, compare, texts_for

runner = CliRunner()


@pytest.mark.parametrize("name", ["en-es", "en-lm"])
def test_fp32_answers_do_not_depend_on_their_batch(model_repository: Path, name: str) -> None:
    row = compare(model_repository / name / "1", "fp32", 8, 12, threads=1)
    assert row["texts"] == 8 and row["answers_that_differ"] == 0
    assert 0.0 <= row["max_logit_change"] < 1e-4


def test_prompts_are_the_verses_first_words() -> None:
    verses, prompts = texts_for("translation", 3), texts_for("generation", 3)
    assert [v.split()[:4] for v in verses] == [p.split() for p in prompts]


def test_the_command_writes_its_figures_with_their_provenance(
    model_repository: Path, tmp_path: Path
) -> None:
    out = tmp_path / "invariance.json"
    args = ["--version-dir", str(model_repository / "en-es" / "1"), "--texts", "4",
            "--max-new-tokens", "8", "--threads", "1", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fp32: 0 of 4 answers differ alone vs batched" in result.output
    written = json.loads(out.read_text())
    assert [r["variant"] for r in written["rows"]] == ["fp32", "int8"]
    assert written["command"].startswith("python -m loadtest.invariance")
    assert written["machine"] and written["versions"] and written["git_commit"]


def test_bad_options_are_refused(tmp_path: Path) -> None:
    refused = runner.invoke(app, ["--variants", "fp16"])
    assert refused.exit_code == 2 and "comma list of fp32, int8" in refused.output
    missing = runner.invoke(app, ["--version-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "has no manifest.json" in missing.output

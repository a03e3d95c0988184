"""The decoder-step benchmark on the tiny test models: table, recording, bad options."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from loadtest.step_bench import BEGIN, END, app
from tests.service._engine_models import TRANSLATOR, model_repository

ARGS = ["--model", TRANSLATOR, "--rows", "2", "--steps", "1", "--repeats", "1"]


def test_times_each_cache_length_and_records_its_own_section(tmp_path: Path) -> None:
    md = tmp_path / "benchmarks.md"
    md.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold\n{END}\n\noutro\n")
    repo = str(model_repository())
    result = CliRunner().invoke(
        app, ["--repository", repo, *ARGS, "--caches", "16,32", "--record", str(md)]
    )
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert text.count(BEGIN) == 1 and "old" not in text
    assert "intro" in text and "outro" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 16 |", "| 32 |"))]
    assert len(rows) == 2
    for row in rows:
        best, median = (float(x) for x in row.strip("|").split("|")[1:3])
        assert 0 < best <= median
    assert "Reproduce: `python -m loadtest.step_bench" in text
    # --threads 0 (the default) is every usable core, and the section names that count.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert " 0 threads" not in text and f", {cores} threads:" in text


def test_bad_cache_lengths_are_refused_naming_the_limit() -> None:
    repo = str(model_repository())
    result = CliRunner().invoke(app, ["--repository", repo, *ARGS, "--caches", "16,x"])
    assert result.exit_code != 0 and "--caches must be integers" in result.output
    result = CliRunner().invoke(app, ["--repository", repo, *ARGS, "--caches", "4096"])
    assert result.exit_code != 0
    assert "cache length 4096 exceeds the model's max_positions" in result.output

"""The device-call scripts (loadtest/device): they run where no test can, so check here
that they parse and that the run script walks its stages within its time budget."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "loadtest" / "device" / name for name in ("stage.sh", "run.sh")]
STAGES = ("nvml", "export", "gpu_check", "gpu_bench", "served")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_run_skips_every_stage_when_out_of_budget(tmp_path: Path) -> None:
    """With no time left each stage is skipped, named, in priority order, and the run
    still hands back docs/benchmarks.md for the GPU sections."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "REHEARSAL": "1",
        "RUN_BUDGET_S": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "run.log").read_text()
    skipped = [line.split("] ")[1].split(":")[0] for line in log.splitlines() if "skipped" in line]
    assert tuple(skipped) == STAGES
    assert (tmp_path / "benchmarks.md").read_text() == (ROOT / "docs/benchmarks.md").read_text()


def test_run_refuses_without_out() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(
        ["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "OUT" in result.stderr

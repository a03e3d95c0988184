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


def test_a_rehearsal_exports_into_a_scratch_repository(tmp_path: Path) -> None:
    """A rehearsal on a dev machine must not re-export the checkout's models/ (the device's
    fp32+fp16 export would drop the int8 graphs `make serve` uses on the CPU). A python3 on
    PATH that records its arguments stands in for every stage."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    if not any((ROOT / "models").glob("*/checkpoint")):
        pytest.skip("no checkpoints under models/")
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    calls = tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OUT": str(out),
        "REHEARSAL": "1",
        "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", str(SCRIPTS[1])], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls.read_text().splitlines()
    export = next(line for line in lines if line.startswith("-m export --repository"))
    repo = Path(export.split()[3])
    assert repo.name == "models" and repo.resolve() != (ROOT / "models").resolve()
    assert not repo.exists()  # the scratch copy is removed at the end
    check = next(line for line in lines if line.startswith("-m export.gpu_check"))
    assert f"--version-dir {repo}/en-es/1" in check
    served = next(line for line in lines if line.startswith("-m loadtest.bench"))
    assert f"--repository {repo}" in served


def test_the_fixed_stages_leave_the_served_benchmark_its_share() -> None:
    """The stages' own limits add up to less than the run's budget, so the last stage is
    not squeezed to nothing (it once asked for 665 s of 570), and it is given the time
    left as its own budget, so that it ends and writes its results before its limit."""
    import re

    text = SCRIPTS[1].read_text()
    budget = int(re.search(r"RUN_BUDGET_S:-(\d+)", text).group(1))  # type: ignore[union-attr]
    fixed = {m[0]: int(m[1]) for m in re.findall(r"run_stage (\w+) (\d+) ", text)}
    assert set(fixed) == set(STAGES) - {"served"}
    # loadtest.bench skips every served mode below its need at these arguments (2 modes ×
    # (10 + 10) s, 10 Poisson steps of 6 s, 60 s: 160 s), and the stage keeps 50 s of
    # margin; the setup before the first stage takes some 20 s more.
    assert budget - sum(fixed.values()) >= 160 + 50 + 30, fixed
    assert 'run_stage served "$served_s"' in text and '--max-minutes "$served_min"' in text

"""The device-call scripts (loadtest/device): they run where no test can, so check here
that they parse and that the run script walks its stages within its time budget."""

from __future__ import annotations

import os
import re
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


def _rehearse(tmp_path: Path, python3: str, **env: str) -> Path:
    """Run run.sh as a rehearsal with `python3` (a shell script) on PATH standing in for
    every stage; returns its $OUT."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n" + python3)
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    full_env = {
        **os.environ,
        "OUT": str(out),
        "REHEARSAL": "1",
        "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **env,
    }
    result = subprocess.run(
        ["bash", str(SCRIPTS[1])], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_a_rehearsal_exports_into_a_scratch_repository(tmp_path: Path) -> None:
    """A rehearsal on a dev machine must not re-export the checkout's models/ (the device's
    fp32+fp16 export would drop the int8 graphs `make serve` uses on the CPU). A python3 on
    PATH that records its arguments stands in for every stage."""
    if not any((ROOT / "models").glob("*/checkpoint")):
        pytest.skip("no checkpoints under models/")
    calls = tmp_path / "calls.txt"
    _rehearse(tmp_path, f'echo "$*" >> {calls}\n')
    lines = calls.read_text().splitlines()
    export = next(line for line in lines if line.startswith("-m export --repository"))
    repo = Path(export.split()[3])
    assert repo.name == "models" and repo.resolve() != (ROOT / "models").resolve()
    assert export.endswith("--exporter torchscript")  # 5x faster: the stage has 80 s
    assert not repo.exists()  # the scratch copy is removed at the end
    check = next(line for line in lines if line.startswith("-m export.gpu_check"))
    assert f"--version-dir {repo}/en-es/1" in check
    served = next(line for line in lines if line.startswith("-m loadtest.bench"))
    assert f"--repository {repo}" in served
    assert "--inputs tests/fixtures/verses.tsv" in served  # data/ is not carried


def test_what_comes_back_fits_the_tools_eight_files(tmp_path: Path) -> None:
    """The device tool brings back 8 files at most from $OUT: every stage writing all it
    can, and the served benchmark leaving several logs, the run leaves no more, and the
    logs' ends come back in one file."""
    out = _rehearse(
        tmp_path,
        'while [ $# -gt 0 ]; do case "$1" in\n'
        '  --out|--json-out|--out-json|--out-md) echo x > "$2"; shift;;\n'
        '  --work-dir) mkdir -p "$2"\n'
        '    for n in a b c d e; do echo log-$n > "$2/$n.log"; done; shift;;\n'
        "esac; shift; done\n",
    )
    back = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(back) <= 8, back
    assert {"gpu_bench.json", "bench_gpu.json", "gpu_check.json", "bench-logs.txt"} <= set(back)
    logs = (out / "bench-logs.txt").read_text()
    assert all(f"=== {n}.log" in logs and f"log-{n}" in logs for n in "abcde")


def _captured(pattern: str, text: str) -> str:
    """What `pattern`'s group captures in `text` (which must hold it)."""
    found = re.search(pattern, text)
    assert found is not None, pattern
    return found.group(1)


def _int_after(pattern: str, text: str) -> int:
    return int(_captured(pattern, text))


def _served_need_at_run_sh_arguments(text: str) -> float:
    """loadtest.bench's served_need_s at the served stage's arguments in run.sh."""
    from loadtest.bench import SERVED_MODES, served_need_s

    served = text[text.index("run_stage served") :]

    def arg(name: str) -> str:
        return _captured(rf"--{name} (\S+)", served)

    skip = arg("skip").split(",")
    return served_need_s(
        [m for m in SERVED_MODES if m not in skip],
        float(arg("served-s")),
        float(arg("poisson-s")),
        [float(f) for f in arg("poisson-fractions").split(",")],
        [float(f) for f in arg("generate-fractions").split(",")],
    )


def test_the_fixed_stages_leave_the_served_benchmark_its_share() -> None:
    """The served benchmark runs whole or not at all, so gpu_bench, the stage before it,
    leaves it what loadtest.bench needs at its arguments plus the stage's 10 s and the 40 s
    its --max-minutes keeps (it once reserved 160 s where the bench needed 184)."""
    text = SCRIPTS[1].read_text()
    floor = _int_after(r"served_floor_s=(\d+)", text)
    assert "served_s=$(($(left) - 10))" in text and "m = (s - 40) / 60" in text
    assert floor >= _served_need_at_run_sh_arguments(text) + 10 + 40 + 5
    budget = _int_after(r"RUN_BUDGET_S:-(\d+)", text)
    fixed = {m[0]: int(m[1]) for m in re.findall(r"run_stage (\w+) (\d+) ", text)}
    assert set(fixed) == {"nvml", "export", "gpu_check"}
    # The setup before the first stage (unpacking onnxruntime-gpu, the wheels) takes
    # some 20 s; gpu_bench must still get a useful share after the fixed stages.
    assert budget - sum(fixed.values()) - 20 - floor >= 100, fixed
    assert 'run_stage served "$served_s"' in text and '--max-minutes "$served_min"' in text


def test_gpu_bench_leaves_the_served_floor(tmp_path: Path) -> None:
    """gpu_bench's limit is what is left less the served benchmark's floor, so a slow
    setup or slow earlier stages come out of gpu_bench, not out of the served benchmark."""
    budget = 300
    out = _rehearse(tmp_path, "exit 0\n", RUN_BUDGET_S=str(budget))
    log = (out / "run.log").read_text()
    floor = _int_after(r"served_floor_s=(\d+)", SCRIPTS[1].read_text())
    limit = _int_after(r"gpu_bench: start \(at most (\d+)s\)", log)
    assert limit <= budget - floor, log

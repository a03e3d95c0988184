"""Benchmark plumbing that needs no engines: ratios, interpolation, Markdown, batching."""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loadtest import gpu_bench
from loadtest.baselines import (
    PhaseConfig,
    PhaseResult,
    _strip,
    length_batches,
    run_batches,
    run_phase,
)
from loadtest.bench import (
    BEGIN,
    END,
    BenchArgs,
    ServedMode,
    equal_p50,
    markdown,
    markers,
    poisson_rates,
    ratios,
    rps_at_p50,
    run_served,
    write_markdown,
)
from loadtest.workload import CallOutcome, WorkItem


def point(rps: float, p50: float | None) -> dict[str, Any]:
    return {"throughput_rps": rps, "latency_s": {"p50": p50}}


def test_rps_at_p50_interpolates_and_bounds() -> None:
    pts = [point(1, 0.1), point(2, 0.2), point(4, 0.6)]
    assert rps_at_p50(pts, 0.4)[:2] == (pytest.approx(3.0), "")
    assert rps_at_p50(pts, 1.0)[:2] == (4, ">=")
    assert rps_at_p50(pts, 0.05)[:2] == (1, "<")


def test_rps_at_p50_follows_offered_load_past_saturation() -> None:
    """A step past capacity serves fewer req/s than the one before: the curve runs in
    order of offered load, not of what was served."""
    pts = [
        {**point(10, 0.1), "offered_rate": 10},
        {**point(19, 0.5), "offered_rate": 20},
        {**point(18, 5.0), "offered_rate": 30},
    ]
    assert rps_at_p50(pts, 1.0)[:2] == (pytest.approx(19 - 0.5 / 4.5), "")
    assert rps_at_p50([*pts[:2], {**point(18, 0.7), "offered_rate": 30}], 1.0)[:2] == (19, ">=")
    baseline = [{**point(9, 2.0), "offered_rate": 30}, {**point(8, 0.1), "offered_rate": 8}]
    assert [p["baseline_rps"] for p in equal_p50(baseline, pts)] == [8, 9]  # by offered load
    assert rps_at_p50([point(1, None)], 0.1)[:2] == (None, "")


def test_poisson_rates_merge_close_values() -> None:
    assert poisson_rates([0.5, 1.0], [10.0]) == [5.0, 10.0]
    assert poisson_rates([0.5, 1.0], [10.0, 10.5]) == [5.0, 10.0]
    assert poisson_rates([0.5], [10.0, 30.0]) == [5.0, 15.0]


def served(mode: str, tps: float, poisson: list[dict[str, Any]]) -> ServedMode:
    closed = {
        "tokens_per_s": tps,
        "throughput_rps": tps / 10,
        "concurrency": 64,
        "ok": 10,
        "latency_s": {"p50": 0.1, "p99": 0.2},
    }
    return ServedMode(mode, closed=closed, poisson=poisson)


def test_ratios_and_targets() -> None:
    offline: dict[str, dict[str, Any]] = {
        "engine": {"status": "ok", "tokens_per_s": 1000.0},
        "pytorch": {"status": "ok", "tokens_per_s": 50.0},
        "hf": {"status": "skipped", "reason": "transformers not installed"},
        "ct2": {"status": "ok", "tokens_per_s": 400.0},
        "ort": {"status": "ok", "tokens_per_s": 800.0},
    }
    modes = {
        "static": served("static", 500.0, [point(10, 0.2), point(20, 0.5)]),
        "continuous": served("continuous", 950.0, [point(10, 0.1), point(30, 0.3), point(40, 0.7)]),
    }
    modes["static"].generate = [point(10, 0.4), point(20, 1.0)]
    modes["continuous"].generate = [point(10, 0.1), point(20, 0.2), point(40, 0.6)]
    # The answers-at-batch-end baseline runs translations only.
    modes["static-hold"] = served("static-hold", 400.0, [point(10, 0.3), point(20, 0.7)])
    rows = {r["ratio"]: r for r in ratios(offline, modes)}
    hold = rows["continuous / static-hold at equal p50, translations (Poisson req/s)"]
    # static-hold's busiest step: 20 req/s at p50 0.7 s, which continuous reaches at 40.
    assert hold["value"] == pytest.approx(40 / 20) and hold["met"] is True
    assert "static-hold's p50 at its busiest" in hold["note"]
    assert rows["continuous / static-hold (closed-loop tokens/s)"]["value"] == pytest.approx(
        950 / 400
    )
    assert not any("static-hold at equal p50, streamed" in name for name in rows)
    assert rows["served / offline (engine, tokens/s)"]["value"] == pytest.approx(0.95)
    assert rows["served / offline (engine, tokens/s)"]["met"] is True
    assert rows["served / naive PyTorch (tokens/s)"]["value"] == pytest.approx(19.0)
    assert rows["served / Hugging Face generate (tokens/s)"]["value"] is None
    equal = rows["continuous / static at equal p50, translations (Poisson req/s)"]
    # static's busiest step: 20 req/s at p50 0.5 s; continuous reaches 0.5 s at 35 req/s.
    assert equal["value"] == pytest.approx(35 / 20)
    assert equal["met"] is True
    # The note gives the spread over every static step: 0.2 s -> 20 req/s (2.0x at 10).
    assert "1.75–2.00×" in equal["note"]
    # Generations get their own row: static's busiest step 20 req/s at p50 1.0 s, which
    # continuous passes beyond its busiest step (40 req/s at 0.6 s): a lower bound.
    gen = rows["continuous / static at equal p50, streamed generations (Poisson req/s)"]
    assert gen["value"] == pytest.approx(40 / 20) and gen["qualifier"] == ">="
    assert gen["met"] is True and gen["target"] == 1.5


def test_generation_row_absent_without_generations() -> None:
    modes = {
        "static": served("static", 500.0, [point(10, 0.2)]),
        "continuous": served("continuous", 500.0, [point(10, 0.1), point(20, 0.3)]),
    }
    names = [r["ratio"] for r in ratios({}, modes)]
    assert "continuous / static at equal p50, translations (Poisson req/s)" in names
    assert not any("streamed generations" in n for n in names)


def test_equal_p50_curve_per_static_step() -> None:
    static = [point(20, 0.5), point(10, 0.2), point(30, 2.0), point(5, None)]
    continuous = [point(10, 0.1), point(30, 0.3), point(40, 0.7)]
    curve = equal_p50(static, continuous)
    assert [p["baseline_rps"] for p in curve] == [10, 20, 30]  # by load; no p50 -> left out
    assert [p["continuous_rps"] for p in curve] == [pytest.approx(20.0), pytest.approx(35.0), 40]
    assert [p["qualifier"] for p in curve] == ["", "", ">="]
    assert curve[2]["ratio"] == pytest.approx(40 / 30)


def test_equal_p50_table_in_markdown(tmp_path: Path) -> None:
    def step(rps: float, p50: float) -> dict[str, Any]:
        return {
            **point(rps, p50),
            "offered_rate": rps,
            "tokens_per_s": rps * 10,
            "errors": {},
            "latency_s": {"p50": p50, "p99": 2 * p50},
        }

    from dataclasses import asdict

    data = bench_data(tmp_path)
    modes = {
        "static": served("static", 500.0, [step(10, 0.2), step(30, 2.0)]),
        "continuous": served("continuous", 500.0, [step(10, 0.1), step(30, 0.3), step(40, 0.7)]),
    }
    modes["continuous"].generate = [
        {**step(8, 0.5), "ttft_s": {"p50": 0.02, "p99": 0.09}, "tokens_per_message": 1.25},
        {**step(16, 0.6), "ttft_s": {"p50": 0.03, "p99": 0.1}},
    ]
    modes["static"].generate = [{**step(8, 1.2), "ttft_s": {"p50": 0.4, "p99": 0.9}}]
    modes["static-hold"] = ServedMode("static-hold", "skipped", "--skip")
    data["served"] = {k: asdict(v) for k, v in modes.items()}
    text = markdown(data)
    assert (
        "| served, static, answers at batch end | gRPC, closed loop, concurrency – | skipped"
        in text
    )
    assert "| 200 | 10.00 | 20.00 | 2.00× |" in text
    # One generation row per mode and rate; TTFT in ms; tokens per message where measured.
    assert "| continuous | 8.00 | 8.00 | 80.0 | 20 | 90 | 500 | 1000 | 1.25 | none |" in text
    assert "| continuous | 16.00 | 16.00 | 160.0 | 30 | 100 | 600 | 1200 | – | none |" in text
    assert "| static | 8.00 | 8.00 | 80.0 | 400 | 900 | 1200 | 2400 | – | none |" in text
    # Each workload has its own equal-p50 table: static 8 req/s at 1.2 s; continuous
    # stays below 1.2 s up to its busiest step, 16 req/s.
    assert "Equal-p50 comparison with static, translations" in text
    assert "Equal-p50 comparison with static, streamed generations" in text
    assert "| 1200 | 8.00 | >=16.00 | >=2.00× |" in text
    assert "| 2000 | 30.00 | >=40.00 | >=1.33× |" in text


def bench_data(tmp_path: Path) -> dict[str, Any]:
    offline: dict[str, dict[str, Any]] = {
        "engine": {
            "status": "ok",
            "tokens_per_s": 1000.0,
            "requests": 10,
            "latency_unit": "request",
            "latency_p50_s": 0.1,
            "latency_p99_s": 0.2,
            "peak_rss_bytes": 2**28,
            "agreement": {"same": 9, "compared": 10},
        },
        "hf": {"status": "skipped", "reason": "transformers not installed"},
    }
    modes = {
        "static": served(
            "static",
            500.0,
            [
                {
                    **point(10, 0.2),
                    "offered_rate": 10.0,
                    "tokens_per_s": 100.0,
                    "errors": {},
                    "latency_s": {"p50": 0.2, "p99": 0.4},
                }
            ],
        )
    }
    from dataclasses import asdict

    return {
        "finished": "now",
        "seconds": 60.0,
        "command": "python -m loadtest.bench",
        "git_commit": "abc",
        "machine": {
            "Model name": "CPU",
            "usable_cores": 2,
            "loadavg_at_start": ["1", "1", "1"],
            "python": "3",
        },
        "versions": {"numpy": "2"},
        "settings": {
            "model": "en-es/1",
            "variant": "fp32",
            "inputs": "x",
            "inputs_used": 10,
            "max_new_tokens": 8,
            "batch_size": 4,
            "threads": 2,
            "phase_s": 5,
        },
        "offline": offline,
        "served": {k: asdict(v) for k, v in modes.items()},
        "ratios": ratios(offline, modes),
    }


def test_markdown_section_replaced_and_rest_kept(tmp_path: Path) -> None:
    md = tmp_path / "benchmarks.md"
    md.write_text(
        "# Benchmarks\n\nintro\n\n<!-- BEGIN gpu-bench: x -->\nGPU\n<!-- END gpu-bench -->\n"
    )
    text = markdown(bench_data(tmp_path))
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "| serving engine offline |" in text and "9/10" in text
    assert "skipped: transformers not installed" in text
    write_markdown(md, text)
    write_markdown(md, text.replace("9/10", "8/10"))  # second run replaces, not appends
    out = md.read_text()
    assert out.count(BEGIN) == 1 and "8/10" in out and "9/10" not in out
    assert "intro" in out and "GPU\n<!-- END gpu-bench -->" in out


def test_cuda_run_writes_its_own_section(tmp_path: Path) -> None:
    """A --provider cuda run fills the GPU served section and leaves the CPU one alone."""
    md = tmp_path / "benchmarks.md"
    cpu_text = markdown(bench_data(tmp_path))
    write_markdown(md, cpu_text)
    data = bench_data(tmp_path)
    data["settings"]["provider"] = "cuda"
    data["machine"]["gpu"] = "NVIDIA H200, 143771 MiB, 580.159.03"
    data["served"]["static"]["gpu_memory_used_bytes"] = 3 * 2**30
    gpu_text = markdown(data)
    gpu_begin, gpu_end = markers("cuda")
    assert gpu_text.startswith(gpu_begin) and gpu_text.rstrip().endswith(gpu_end)
    assert "## Served on the GPU" in gpu_text and "**NVIDIA H200, 143771 MiB" in gpu_text
    assert "fp16 on the CUDA provider" in gpu_text and "(NVML): 3.00 GiB" in gpu_text
    write_markdown(md, gpu_text, "cuda")
    out = md.read_text()
    assert out.count(BEGIN) == 1 and out.count(gpu_begin) == 1
    assert cpu_text.strip() in out and gpu_text.strip() in out


def test_bench_refuses_unknown_provider(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loadtest.bench import app

    result = CliRunner().invoke(app, ["--provider", "tpu", "--repository", str(tmp_path)])
    assert result.exit_code == 2 and "--provider must be one of cpu, cuda" in result.output


def test_the_json_goes_beside_the_markdown_unless_named(
    model_repository: Path, tmp_path: Path
) -> None:
    """A one-off run with its own --out-md must not overwrite docs/benchmarks.json."""
    from typer.testing import CliRunner

    from loadtest.bench import app

    nothing = "pytorch,hf,ct2,ort,engine,static,static-hold,static-padded,continuous"
    common = ["--repository", str(model_repository), "--skip", nothing, "--n-inputs", "2"]
    result = CliRunner().invoke(app, [*common, "--out-md", str(tmp_path / "b.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.json").is_file() and (tmp_path / "b.md").is_file()
    named = tmp_path / "elsewhere" / "named.json"
    result = CliRunner().invoke(
        app, [*common, "--out-md", str(tmp_path / "c.md"), "--out-json", str(named)]
    )
    assert result.exit_code == 0, result.output
    assert named.is_file() and not (tmp_path / "c.json").exists()


def _bench_args(tmp_path: Path, **overrides: Any) -> BenchArgs:
    """Small, fast benchmark settings (two fake or real servers' worth); tests override
    what they exercise."""
    settings: dict[str, Any] = dict(
        repository=tmp_path,
        model="en-es",
        variant="fp32",
        provider="cpu",
        inputs=tmp_path / "unused.tsv",
        n_inputs=20,
        max_new_tokens=4,
        batch_size=2,
        threads=1,
        phase_s=1.0,
        served_s=0.3,
        poisson_s=0.4,
        poisson_fractions=[0.2],
        server_start_s=1.0,
        generate_fractions=[0.2],
        seed=0,
        skip=[],
    )
    return BenchArgs(**(settings | overrides))


def _served_start(
    repository: Path, tmp_path: Path, names: list[str], **overrides: Any
) -> dict[str, ServedMode]:
    """run_served on one short step, for servers that never serve: asserts it gives up at
    once, not after its start timeout (on the device that would burn the GPU lease)."""
    settings: dict[str, Any] = dict(
        n_inputs=1, batch_size=4, served_s=1.0, poisson_s=1.0, poisson_fractions=[0.5],
        server_start_s=120.0, generate_fractions=[],
    )  # fmt: skip
    args = _bench_args(tmp_path, repository=repository, **{**settings, **overrides})
    started = time.perf_counter()
    modes = run_served(names, repository, ["In the beginning"], args, tmp_path, {})
    assert time.perf_counter() - started < 60
    return modes


@pytest.mark.e2e
def test_served_run_fails_fast_when_no_model_loads(model_repository: Path, tmp_path: Path) -> None:
    """A server that loads no model stays up NOT_SERVING: the bench says why at once."""
    import shutil

    broken = tmp_path / "models"
    shutil.copytree(model_repository, broken)
    for decoder in broken.glob("*/1/*/decoder.onnx"):
        decoder.write_bytes(b"not the exported graph")  # its manifest's sha256 differs
    modes = _served_start(broken, tmp_path, ["static", "continuous"])
    assert modes["static"].status == modes["continuous"].status == "failed"
    assert "the static server could load no model" in modes["static"].reason
    # The other side-by-side server is not blamed for it.
    assert modes["continuous"].reason.startswith("not measured: the servers run side by side")
    assert "sha256" in modes["static"].reason  # the server log's reason


@pytest.mark.e2e
def test_served_run_names_a_server_that_exits_at_start(
    model_repository: Path, tmp_path: Path
) -> None:
    """--provider cuda without onnxruntime's CUDA provider: the server exits 1 at start, and
    the bench says so with the server's own reason, at once."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has CUDA here: the cuda servers would load")
    modes = _served_start(model_repository, tmp_path, ["static"], provider="cuda")
    assert modes["static"].status == "failed"
    assert "the static server exited with 1" in modes["static"].reason
    assert "no CUDAExecutionProvider" in modes["static"].reason


@pytest.mark.e2e
def test_a_slow_server_start_ends_by_the_deadline(model_repository: Path, tmp_path: Path) -> None:
    """Servers still loading when the steps would have to end (--max-minutes, less the
    drain margin) are given up on then, not after their own start timeout: on the device
    a warm-up of every shape can take minutes, and the stage must still write its results."""
    from loadtest.bench import STEP_MARGIN_S

    # Due as the servers start: no server answers SERVING at the first look, a moment
    # after its process began (the test's tiny models are served within 0.5 s).
    deadline = time.perf_counter() + STEP_MARGIN_S
    modes = _served_start(model_repository, tmp_path, ["continuous"], deadline=deadline)
    assert time.perf_counter() < deadline - STEP_MARGIN_S + 15
    assert modes["continuous"].status == "failed"
    assert "the continuous server not SERVING after" in modes["continuous"].reason


def test_fraction_lists_are_checked() -> None:
    import typer

    from loadtest.bench import _fractions

    assert _fractions("0.2, 0.4,") == [0.2, 0.4] and _fractions("") == []
    with pytest.raises(typer.BadParameter, match="comma list of numbers"):
        _fractions("0.2,x")
    with pytest.raises(typer.BadParameter, match=r"in \(0, 10\]"):
        _fractions("0.5,0")


def test_length_batches_and_budget() -> None:
    srcs = [[1] * n for n in (5, 1, 3, 2, 4)]
    assert length_batches(srcs, 2) == [[1, 3], [2, 4], [0]]
    result = PhaseResult("x")
    run_batches(result, srcs, [[0, 1], [2, 3], [4]], lambda b: [[7] * len(s) for s in b], 60.0)
    assert result.requests == 5 and result.output_tokens == 15
    assert set(result.outputs) == {0, 1, 2, 3, 4}
    stopped = PhaseResult("y")
    run_batches(stopped, srcs, [[0], [1], [2]], lambda b: [[7] for _ in b], -1.0)
    assert stopped.requests == 1 and "budget" in stopped.notes[0]
    assert _strip([5, 6, 3, 0, 0], eos=3) == [5, 6]


def test_the_engine_phase_answers_every_verse_and_ends_at_its_budget() -> None:
    """The serving engine offline row (rows refilled every step, newcomers encoded while
    the batch steps) answers every verse once; past its budget it admits no more and ends
    (it stepped an empty batch for good while verses were left)."""
    from tests.service._engine_models import SOURCES, TRANSLATOR, model_repository

    texts = [*SOURCES, *SOURCES]
    cfg = PhaseConfig(
        checkpoint="",
        version_dir=str(model_repository() / TRANSLATOR / "1"),
        variant="fp32",
        texts=texts,
        max_new_tokens=12,
        batch_size=2,
        threads=1,
        budget_s=60.0,
        work_dir="",
    )
    full = run_phase("engine", cfg)
    assert full.status == "ok" and full.requests == len(texts)
    assert sorted(full.outputs) == list(range(len(texts)))
    ended: list[PhaseResult] = []
    runner = threading.Thread(
        target=lambda: ended.append(run_phase("engine", replace(cfg, budget_s=0.0))), daemon=True
    )
    runner.start()
    runner.join(60)
    assert ended, "the engine phase did not end past its budget"
    stopped = ended[0]
    assert stopped.status == "ok" and "budget" in stopped.notes[0]
    assert stopped.requests < len(texts)


def test_gpu_bench_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_bench.main(["--configs", "base"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_bench_roofline_bytes_match_anchor() -> None:
    # serving-anchors.md: a Transformer-base decode step reads ~77 MB of fp16 weights.
    shape = gpu_bench.Shape(layers=6, d_model=512, d_ff=2048, vocab=32000)
    assert shape.weight_bytes_per_step() / 1e6 == pytest.approx(77, rel=0.01)
    # 64 rows, 16 cached + 32 source tokens: 6 * 64 * 48 * 512 * 2 (k, v) * 2 bytes.
    assert shape.cache_bytes_per_step(64, 16, 32) == 6 * 64 * 48 * 512 * 4
    assert gpu_bench.roofline_s(3.35e12 * 23e-6, 3.35e12) == pytest.approx(23e-6)


def test_gpu_bench_record_from_json(tmp_path: Path) -> None:
    result = {
        "header": {
            "device": "H100",
            "memory_gib": 80,
            "measured_bandwidth_gb_s": 3000,
            "torch": "2",
            "cuda": "13",
        },
        "figures": [
            {
                "config": "base",
                "engine": "hf generate",
                "batch": 64,
                "status": "ok",
                "reason": "",
                "tokens_per_s": 15600.0,
                "step_ms": 4.0,
                "roofline_step_us": 30.0,
                "step_bytes_mb": 90.0,
                "gpu_mem_gib": 1.0,
            }
        ],
        "summary": ["base b=64: HF generate 15600 tok/s"],
        "command": "python -m loadtest.gpu_bench",
    }
    import json

    saved = tmp_path / "gpu.json"
    saved.write_text(json.dumps(result))
    md = tmp_path / "benchmarks.md"
    assert gpu_bench.main(["--from-json", str(saved), "--record", str(md)]) == 0
    text = md.read_text()
    assert gpu_bench.BEGIN in text and "| base | hf generate | 64 | 15600 | 4.00 | 30.0 |" in text
    assert "| 133 |" in text  # 4 ms over 30 us


def test_gpu_bench_records_a_command_that_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorded command, read back by a shell, gives the script the same arguments: an
    empty one (`--hf-batches ""`, as docs/benchmarks.md runs it) or a path with a space
    included (joined unquoted, it read `--hf-batches  --new-tokens 32`, which fails)."""
    monkeypatch.setattr(
        gpu_bench, "run", lambda s, cpu_dry_run=False: {"header": {}, "figures": [], "summary": []}
    )
    out = tmp_path / "with space" / "gpu.json"
    args = ["--cpu-dry-run", "--configs", "tiny", "--hf-batches", "", "--out", str(out)]
    assert gpu_bench.main(args) == 0
    command = json.loads(out.read_text())["command"]
    assert shlex.split(command) == ["python", "-m", "loadtest.gpu_bench", *args]


@pytest.mark.slow
def test_gpu_bench_cpu_dry_run(tmp_path: Path) -> None:
    """Every stage of the GPU script on a toy model on the CPU (catches bit-rot without a GPU)."""
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    args = [
        "--cpu-dry-run",
        "--configs",
        "tiny",
        "--batches",
        "2",
        "--hf-batches",
        "",
        "--new-tokens",
        "4",
        "--source-len",
        "6",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert gpu_bench.main(args) == 0
    figures = json.loads(out.read_text())["figures"]
    status = {(f["engine"], f["batch"]): f["status"] for f in figures}
    assert status[("pytorch eager", 2)] == "ok", figures
    assert status[("serving engine", 2)] == "ok", figures
    assert status[("serving engine, no CUDA graphs", 2)] == "ok", figures
    summary = json.loads(out.read_text())["summary"]
    assert any("with CUDA graphs" in line and "same tokens: yes" in line for line in summary)
    host = [line for line in summary if "outside onnxruntime" in line]
    assert len(host) == 2  # the engine with and without graphs
    engine = next(f for f in figures if f["engine"] == "serving engine")
    assert 0 < engine["extra"]["engine_host_p50_ms"] < engine["extra"]["engine_step_p50_ms"]
    # The fixed-buffer decoder-step probe runs; its CUDA graph twin needs CUDA.
    assert status[("decoder step", 2)] == "ok", figures
    assert status[("decoder step, CUDA graph", 2)] == "skipped", figures
    assert all(f["tokens_per_s"] > 0 for f in figures if f["status"] == "ok")


@pytest.mark.slow
def test_gpu_bench_keeps_what_it_measured_when_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device call's time can run out mid-run: the figures measured by then are in the
    result file (marked partial) and can still be recorded."""
    pytest.importorskip("torch")

    class Cut(BaseException):  # what a kill is to the script: nothing catches it
        pass

    def killed(*args: object, **kwargs: object) -> None:
        raise Cut

    monkeypatch.setattr(gpu_bench, "bench_engine", killed)
    out = tmp_path / "gpu.json"
    args = ["--cpu-dry-run", "--configs", "tiny", "--batches", "2", "--hf-batches", ""]
    args += ["--new-tokens", "4", "--source-len", "6", "--repeats", "1", "--out", str(out)]
    with pytest.raises(Cut):
        gpu_bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["partial"] and "cut short" in saved["command"]
    assert [(f["engine"], f["status"]) for f in saved["figures"]] == [("pytorch eager", "ok")]
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n")
    assert gpu_bench.main(["--from-json", str(out), "--record", str(md)]) == 0
    assert "| tiny | pytorch eager | 2 |" in md.read_text()


def test_modules_import_without_side_effects() -> None:
    for name in ("loadtest.bench", "loadtest.baselines", "loadtest.gpu_bench"):
        assert name in sys.modules


def test_the_range_of_ratios_keeps_its_bounds_qualifiers() -> None:
    """A step where even continuous batching's lightest load was slower reads "<", and the
    range over the steps says so instead of passing its bound off as a ratio."""
    modes = {
        "static": served("static", 500.0, [point(10, 0.05), point(20, 0.2), point(30, 0.9)]),
        "continuous": served("continuous", 500.0, [point(10, 0.1), point(40, 0.3)]),
    }
    row = {r["ratio"]: r for r in ratios({}, modes)}[
        "continuous / static at equal p50, translations (Poisson req/s)"
    ]
    assert "; <1.00–>=1.33× over static's steps" in row["note"], row["note"]


def test_a_bound_on_the_wrong_side_of_the_target_decides_nothing() -> None:
    """A lower bound of 1.33x against a 1.5x target may still meet it, and an upper bound
    of 2.00x may still miss it: neither reads as "no" or "yes" in the met column."""
    short = {
        "static": served("static", 500.0, [point(10, 0.05), point(20, 0.2), point(30, 0.9)]),
        "continuous": served("continuous", 500.0, [point(10, 0.1), point(40, 0.3)]),
    }
    under = {
        "static": served("static", 500.0, [point(10, 0.05)]),
        "continuous": served("continuous", 500.0, [point(20, 0.1), point(40, 0.3)]),
    }
    name = "continuous / static at equal p50, translations (Poisson req/s)"
    lower = {r["ratio"]: r for r in ratios({}, short)}[name]
    assert (lower["qualifier"], lower["value"]) == (">=", pytest.approx(40 / 30))
    assert lower["met"] is None
    upper = {r["ratio"]: r for r in ratios({}, under)}[name]
    assert (upper["qualifier"], upper["value"]) == ("<", pytest.approx(2.0))
    assert upper["met"] is None


def test_a_skipped_baseline_gives_no_rows() -> None:
    modes = {
        "static": served("static", 500.0, [point(10, 0.2)]),
        "static-hold": ServedMode("static-hold", "skipped", "--skip"),
        "static-padded": ServedMode("static-padded", "skipped", "--skip"),
        "continuous": served("continuous", 500.0, [point(10, 0.1), point(20, 0.3)]),
    }
    names = [r["ratio"] for r in ratios({}, modes)]
    assert "continuous / static (closed-loop tokens/s)" in names
    assert not any("static-hold" in name or "static-padded" in name for name in names)


def test_served_rows_count_ok_requests_under_a_header_that_says_so(tmp_path: Path) -> None:
    data = bench_data(tmp_path)
    data["served"]["static"]["closed"] = {"requests": 12, "ok": 9, "concurrency": 4}
    text = markdown(data)
    assert "| engine | how | status | requests ok | tokens/s |" in text
    assert "| served, static batching | gRPC, closed loop, concurrency 4 | ok | 9 |" in text


def _measure_fakes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: Sequence[str],
    delays: dict[str, float],
    sent: dict[str, list[WorkItem]] | None = None,
    **overrides: Any,
) -> dict[str, ServedMode]:
    """bench.measure_served over fake servers, one per name, each answering a call after
    delays[name] seconds (0.01 unless given), all calls recorded in `sent` by name."""
    import asyncio

    from loadtest import bench

    calls = sent if sent is not None else {}

    class Fake:
        def __init__(self, address: str, **_: Any) -> None:
            self.address = address
            calls[address] = []

        async def wait_ready(self, timeout_s: float = 10.0) -> None:
            return None

        async def close(self) -> None:
            return None

        async def __call__(self, item: WorkItem) -> CallOutcome:
            calls[self.address].append(item)
            await asyncio.sleep(delays.get(self.address, 0.01))
            return CallOutcome(output_tokens=len(item.text.split()))

    monkeypatch.setattr(bench, "GrpcCaller", Fake)
    args = _bench_args(tmp_path, **overrides)
    texts = [f"verse {'word ' * i}{i}" for i in range(20)]
    modes = {name: ServedMode(name) for name in names}
    asyncio.run(bench.measure_served({m: m for m in modes}, texts, args, modes))
    return modes


def test_served_steps_that_would_end_past_the_deadline_are_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The closed loops fit before the deadline, a 30 s Poisson step does not: the
    measurements stop there, keep what they measured and say why (on the device, a
    benchmark killed by its stage's limit would have kept nothing)."""
    import time

    from loadtest import bench

    deadline = time.perf_counter() + bench.STEP_MARGIN_S + 20
    names = ("static", "continuous")
    modes = _measure_fakes(tmp_path, monkeypatch, names, {}, poisson_s=30.0, deadline=deadline)
    assert time.perf_counter() < deadline
    for mode in modes.values():
        assert mode.closed["ok"] > 0 and not mode.poisson and not mode.generate
        assert (mode.status, mode.reason) == ("ok", bench.CUT_SHORT)


def test_every_served_mode_gets_the_same_requests_at_each_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The equal-p50 comparison holds only if a step sends each mode the same inputs, not
    the next ones of a stream the modes share (a different length mix per mode). The
    static server is slower: its closed loop takes fewer requests."""
    from loadtest import bench

    monkeypatch.setattr(bench, "BRACKET", ())  # steps for continuous alone: the next test
    sent: dict[str, list[WorkItem]] = {}
    modes = _measure_fakes(tmp_path, monkeypatch, bench.SERVED_MODES, {"static": 0.02}, sent)
    for attr in ("poisson", "generate"):
        assert len(getattr(modes["static"], attr)) == len(getattr(modes["continuous"], attr)) > 0
    # The padded baseline runs the generation sweep too; static-hold translations only.
    assert len(modes["static-padded"].generate) == len(modes["continuous"].generate)
    assert modes["static-hold"].poisson and not modes["static-hold"].generate
    n_step = sum(p["requests"] for p in modes["static"].poisson + modes["static"].generate)
    # The Poisson steps are the last requests each server got: the same ones, in order.
    static, continuous = sent["static"][-n_step:], sent["continuous"][-n_step:]
    assert [(i.kind, i.text) for i in static] == [(i.kind, i.text) for i in continuous]


@pytest.mark.parametrize("continuous_s", [0.01, 0.03])
def test_continuous_batching_is_loaded_past_capacity_only_until_it_reaches_a_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, continuous_s: float
) -> None:
    """A baseline's p50 (static: 20 ms a call) above all of continuous batching's (10 ms):
    continuous alone runs BRACKET × its top rate of each workload, so the comparison there
    is a value; at 30 ms it already reached it and runs nothing more."""
    from loadtest import bench

    delays = {"static": 0.02, "continuous": continuous_s}
    modes = _measure_fakes(tmp_path, monkeypatch, ("static", "continuous"), delays)
    for attr in ("poisson", "generate"):
        base, own = getattr(modes["static"], attr), getattr(modes["continuous"], attr)
        if continuous_s > 0.02:
            assert len(own) == len(base)
            continue
        assert len(own) == len(base) + len(bench.BRACKET)
        top = max(p["offered_rate"] for p in base)
        assert [p["offered_rate"] for p in own[len(base) :]] == pytest.approx(
            [f * top for f in bench.BRACKET], rel=0.01
        )


def test_a_curve_that_meets_the_p50_later_is_not_an_upper_bound() -> None:
    """Continuous batching's lightest step 70 ms, its next 60 ms (p50s out of order at
    light load): at 65 ms it served 20 req/s, so "<10" (its lightest rate) would contradict
    its own step. The first crossing upward, 60 -> 100 ms, gives the rate."""
    pts = [point(10, 0.07), point(20, 0.06), point(30, 0.1)]
    assert rps_at_p50(pts, 0.065)[:2] == (pytest.approx(21.25), "")
    # Never reached afterwards: a lower bound from the steps at or below it only.
    lighter_slower = [
        {**point(30, 0.07), "offered_rate": 30},
        {**point(20, 0.06), "offered_rate": 40},  # past capacity: served fewer
    ]
    assert rps_at_p50(lighter_slower, 0.065)[:2] == (20, ">=")
    assert rps_at_p50(pts, 0.05)[:2] == (10, "<")  # every step slower: still an upper bound


def test_bounds_are_rounded_so_that_they_still_hold() -> None:
    """A lower bound of 2.005x printed as ">=2.01x" claims more than was measured (the
    recorded run's 50.48 / 25.17 req/s), an upper bound of 1.0018x as "<1.00x" likewise."""
    modes = {
        "static": served("static", 500.0, [point(10, 0.0657), point(25.17486, 9.1)]),
        "continuous": served("continuous", 500.0, [point(10.0179, 0.0661), point(50.47845, 0.4)]),
    }
    row = {r["ratio"]: r for r in ratios({}, modes)}[
        "continuous / static at equal p50, translations (Poisson req/s)"
    ]
    assert row["value"] == pytest.approx(2.00511, abs=1e-5)
    assert "continuous >=50.47; <1.01–>=2.00× over static's steps" in row["note"], row["note"]
    text = markdown(bench_data_for(modes))
    assert "| continuous / static at equal p50, translations (Poisson req/s) | >=2.00× |" in text
    assert "| 9100 | 25.17 | >=50.47 | >=2.00× |" in text
    assert "| 66 | 10.00 | <10.02 | <1.01× |" in text


def test_the_range_of_ratios_is_open_on_the_side_of_a_bound() -> None:
    """Static's lightest step (p50 50 ms) is faster than all of continuous batching: the
    ratio there is below 1.00x, perhaps far below the 0.83x at its busiest step, so the
    range cannot start at 0.83x; a lower bound of 1.2x with an upper bound of 1.5x
    elsewhere does not make the top of the range at least 1.5x."""
    low = {
        "static": served("static", 500.0, [point(10, 0.05), point(60, 0.5)]),
        "continuous": served("continuous", 500.0, [point(10, 0.1), point(50, 0.5)]),
    }
    row = {r["ratio"]: r for r in ratios({}, low)}[
        "continuous / static at equal p50, translations (Poisson req/s)"
    ]
    assert "; <0.84–<1.00× over static's steps" in row["note"], row["note"]
    mixed = {
        "static": served("static", 500.0, [point(10, 0.05), point(50, 2.0)]),
        "continuous": served("continuous", 500.0, [point(15, 0.1), point(60, 0.5)]),
    }
    row = {r["ratio"]: r for r in ratios({}, mixed)}[
        "continuous / static at equal p50, translations (Poisson req/s)"
    ]
    assert "; <1.50–>=1.20× over static's steps" in row["note"], row["note"]


def test_a_busiest_step_that_answered_nothing_is_not_passed_over_in_silence() -> None:
    """Static's busiest step (30 req/s offered) had no successful request: the headline
    compares at its 20 req/s step, and the note must not call that one its busiest."""
    failed = {**point(0.0, None), "offered_rate": 30.0}
    modes = {
        "static": served(
            "static",
            500.0,
            [
                {**point(10, 0.1), "offered_rate": 10.0},
                {**point(19, 0.3), "offered_rate": 20.0},
                failed,
            ],
        ),
        "continuous": served(
            "continuous", 500.0, [point(10, 0.05), point(20, 0.1), point(30, 0.3)]
        ),
    }
    row = {r["ratio"]: r for r in ratios({}, modes)}[
        "continuous / static at equal p50, translations (Poisson req/s)"
    ]
    assert "busiest Poisson step)" not in row["note"], row["note"]
    assert "no successful request at 30.00 req/s offered" in row["note"], row["note"]


def bench_data_for(modes: dict[str, ServedMode]) -> dict[str, Any]:
    """bench_data's run with these served modes (Poisson steps given offered rates and
    the fields the tables print)."""
    from dataclasses import asdict

    for mode in modes.values():
        mode.poisson = [
            {
                "offered_rate": p.get("offered_rate") or p["throughput_rps"],
                "tokens_per_s": 0.0,
                "errors": {},
                **p,
                "latency_s": {"p99": None, **p["latency_s"]},
            }
            for p in mode.poisson
        ]
    data = bench_data(Path("."))
    data["served"] = {k: asdict(v) for k, v in modes.items()}
    data["ratios"] = ratios({}, modes)
    return data


def test_equal_p50_flags_failed_requests() -> None:
    """A p50 is over the requests that succeeded: a row whose steps had failures names
    them, in its table row and, at the busiest step, in the headline's note."""
    failing = {"DEADLINE_EXCEEDED": 4}
    modes = {
        "static": served("static", 500.0, [point(10, 0.2), {**point(20, 1.0), "errors": failing}]),
        "continuous": served(
            "continuous",
            500.0,
            [
                point(10, 0.1),
                {**point(30, 0.5), "errors": {"RESOURCE_EXHAUSTED": 2}},
                point(40, 2.0),
            ],
        ),
    }
    curve = equal_p50(modes["static"].poisson, modes["continuous"].poisson)
    assert curve[0]["baseline_errors"] == {}
    assert curve[0]["continuous_errors"] == {"RESOURCE_EXHAUSTED": 2}  # between 10 and 30
    assert curve[1]["baseline_errors"] == failing
    text = markdown(bench_data_for(modes))
    assert "| 200 | 10.00 | 15.00 | 1.50× | continuous RESOURCE_EXHAUSTED 2 |" in text
    assert (
        "| 1000 | 20.00 | 33.33 | 1.67× "
        "| baseline DEADLINE_EXCEEDED 4; continuous RESOURCE_EXHAUSTED 2 |" in text
    )
    headline = next(line for line in text.splitlines() if "static at equal p50, transl" in line)
    assert "failed requests at these steps (p50 over the rest): baseline DEADLINE_EXCEEDED 4" in (
        headline
    )
    clean = markdown(bench_data_for({k: served(k, 500.0, [point(10, 0.2)]) for k in modes}))
    assert "failed requests at these steps" not in clean


def test_client_limited_steps_are_marked_and_decide_no_target() -> None:
    """A step where the load generator fell behind its schedule (report.summarize's
    client_limited) has a p50 that counts the client's lag: the sweep refuses to judge such
    a step, and the benchmark must not publish it, or a target met on it, as the servers'."""
    limited = {**point(20, 1.0), "client_limited": True}
    modes = {
        "static": served("static", 500.0, [point(10, 0.2), limited]),
        "continuous": served("continuous", 500.0, [point(10, 0.1), point(40, 0.5)]),
    }
    curve = equal_p50(modes["static"].poisson, modes["continuous"].poisson)
    assert [p["client_limited"] for p in curve] == [[], ["baseline"]]
    data = bench_data_for(modes)
    text = markdown(data)
    assert "| static | 20.00 (client-limited) |" in text
    assert "| static | 10.00 |" in text
    assert "| 1000 | 20.00 | >=40.00 | >=2.00× (client-limited: baseline) | none |" in text
    row = next(r for r in data["ratios"] if r["ratio"].startswith("continuous / static at equal"))
    assert row["met"] is None and "client-limited at these steps (baseline)" in row["note"]
    unmarked = {k: served(k, 500.0, [point(10, 0.2), point(20, 1.0)]) for k in modes}
    assert "(client-limited" not in markdown(bench_data_for(unmarked))


def test_the_served_rows_run_the_benchmarked_model_not_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The servers load the whole repository, and a request naming no model gets its default
    translator (en-es when present): `--model` other than that ran the offline rows on one
    model and the served rows and their output check on another."""
    import asyncio

    import grpc

    from loadtest import bench
    from service.gen.inference.v1 import inference_pb2 as pb
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    models: list[str] = []

    class Fake:
        def __init__(self, address: str, translate_model: str = "", **_: Any) -> None:
            models.append(translate_model)

        async def wait_ready(self, timeout_s: float = 10.0) -> None:
            return None

        async def close(self) -> None:
            return None

        async def __call__(self, item: WorkItem) -> CallOutcome:
            await asyncio.sleep(0.01)
            return CallOutcome(output_tokens=2)

    monkeypatch.setattr(bench, "GrpcCaller", Fake)
    monkeypatch.setattr(bench, "BRACKET", ())
    args = _bench_args(tmp_path, model="de-en", generate_fractions=[])
    modes = {name: ServedMode(name) for name in ("static", "continuous")}
    asyncio.run(bench.measure_served({m: m for m in modes}, ["a verse"] * 4, args, modes))
    assert models == ["de-en", "de-en"]

    class Translator(pb_grpc.TranslatorServicer):  # type: ignore[misc]
        async def Translate(self, request: Any, context: Any) -> Any:
            text = "hola" if request.model == "de-en" else "wrong model"
            return pb.TranslateResponse(
                translations=[pb.Translation(hypotheses=[pb.Hypothesis(text=text)])]
            )

    async def check() -> dict[str, int]:
        server = grpc.aio.server()
        pb_grpc.add_TranslatorServicer_to_server(Translator(), server)
        address = f"unix:{tmp_path / 'translator.sock'}"
        server.add_insecure_port(address)
        await server.start()
        try:
            return await bench._check_outputs(address, ["hello"], {"0": "hola"}, 4, "de-en")
        finally:
            await server.stop(None)

    assert asyncio.run(check()) == {"same": 1, "compared": 1}


def test_bench_servers_never_cut_calls_at_a_connection_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection at its max age gives its calls the drain grace (5 s in the bench), then
    cuts them UNAVAILABLE: a baseline whose queued calls waited longer lost 184 at one
    step. The bench's servers run with connections that never age."""
    import subprocess

    from loadtest.bench import start_server
    from service.server import connection_options
    from service.settings import load_settings

    started: list[list[str]] = []

    def popen(argv: list[str], **_: Any) -> None:
        started.append(argv)

    monkeypatch.setattr(subprocess, "Popen", popen)
    start_server("static", tmp_path, _bench_args(tmp_path), tmp_path / "server.log")
    flags = started[0][3:]  # after python -m service
    pairs = zip(flags[::2], flags[1::2], strict=True)  # every flag takes a value
    given: dict[str, Any] = {flag[2:].replace("-", "_"): value for flag, value in pairs}
    settings = load_settings(None, **given)
    assert settings.max_connection_age_s == 0 and settings.drain_grace_s == 5
    assert "grpc.max_connection_age_ms" not in dict(connection_options(settings))

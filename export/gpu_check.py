"""GPU check of an exported version: onnxruntime-gpu, CUDA provider, IOBinding, fp16.

Run on the GPU machine (onnxruntime-gpu installed, no torch needed):

    python -m export.gpu_check --version-dir models/en-es/1 [--data data] [--out docs/gpu_check.md]

It keeps the KV cache on the device the way the engine does: the decoder's new keys and
values stay on the device and a ScatterND graph writes them into the cache there (IOBinding
throughout), the encoder's cross K/V stay on the device, only input ids, positions and
logits cross the bus.

* parity: each GPU variant against onnxruntime CPU fp32 (itself checked against PyTorch
  by `make parity`): teacher-forced logits max-abs error, greedy token identity (LM: a
  right-padded prefill, then steps), and for a translator BLEU/chrF on the test split when
  --data has pairs.test.tsv (otherwise random source ids).
* timings: encoder latency and per-step decoder latency / tokens per second for a few
  batch sizes at a fixed cache capacity.

Without a CUDA provider it exits with status 2 and says what is missing. `--device cpu`
runs the same IOBinding code on the CPU (to test the script itself, not for numbers).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx
import onnxruntime as ort
import typer

from export.manifest import FLOAT_DTYPE, Manifest, load_manifest
from export.runtime import (
    OrtModel,
    bind_layers,
    bucket,
    cache_write_graph,
    cache_write_indices,
    greedy_generate,
    greedy_translate,
    pad_batch,
    teacher_forced_logits,
)

GPU_LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "int8": 2.0}


class GpuUnavailable(RuntimeError):
    """No CUDA execution provider in this onnxruntime build or on this machine."""


def require_cuda() -> None:
    """Fail with what to install when onnxruntime cannot use a CUDA GPU."""
    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, as the engine does
        ort.preload_dlls()
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise GpuUnavailable(
            "onnxruntime has no CUDAExecutionProvider (available: "
            f"{', '.join(providers)}). Run this on the GPU machine with onnxruntime-gpu "
            "installed instead of onnxruntime (pip uninstall onnxruntime && pip install "
            f"onnxruntime-gpu=={ort.__version__}), with a CUDA driver and cuDNN visible."
        )


class BoundModel:
    """One variant's sessions with device-resident caches driven through IOBinding."""

    def __init__(self, version_dir: Path, manifest: Manifest, variant: str, device: str) -> None:
        self.manifest = manifest
        self.variant = variant
        self.device = device
        self.dtype = np.dtype(FLOAT_DTYPE[variant])
        provider: list[Any] = (
            [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3

        def session(graph: str) -> ort.InferenceSession:
            path = version_dir / manifest.graph(variant, graph).path
            sess = ort.InferenceSession(str(path), options, providers=provider)
            if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
                raise GpuUnavailable(
                    f"{path}: the CUDA provider did not load ({sess.get_providers()})"
                )
            return sess

        self.encoder = session("encoder") if manifest.task == "translation" else None
        self.decoder = session("decoder")
        elem = onnx.TensorProto.FLOAT16 if self.dtype == np.float16 else onnx.TensorProto.FLOAT
        self.writer = ort.InferenceSession(cache_write_graph(elem), options, providers=provider)
        cache = manifest.cache
        self.cache_dims = (cache.layers, cache.heads, cache.head_dim)

    def _device_zeros(self, shape: Sequence[int]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype), self.device, 0)

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[ort.OrtValue, ...]:
        assert self.encoder is not None
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("src_ids", src_ids.astype(np.int64))
        binding.bind_cpu_input("src_mask", src_mask.astype(bool))
        binding.bind_output("cross_k", self.device)
        binding.bind_output("cross_v", self.device)
        self.encoder.run_with_iobinding(binding)
        cross_k, cross_v = binding.get_outputs()
        return (
            cross_k,
            cross_v,
            ort.OrtValue.ortvalue_from_numpy(src_mask.astype(bool), self.device, 0),
        )

    def start(self, batch: int, capacity: int) -> None:
        """Zeroed device caches [L, B, H, C, Dh] for keys and values."""
        layers, heads, head_dim = self.cache_dims
        shape = (layers, batch, heads, capacity, head_dim)
        self.k, self.v = self._device_zeros(shape), self._device_zeros(shape)

    def _write(self, cache: ort.OrtValue, new: ort.OrtValue, positions: np.ndarray) -> Any:
        binding = self.writer.io_binding()
        binding.bind_ortvalue_input("cache", cache)
        binding.bind_cpu_input("idx", cache_write_indices(cache.shape(), positions, new.shape()[3]))
        binding.bind_ortvalue_input("new", new)
        binding.bind_output("y", self.device)
        self.writer.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def step(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        cross: tuple[ort.OrtValue, ...] | None = None,
    ) -> np.ndarray:
        """One decoder step on the device; returns the logits [B, T, V] on the host."""
        binding = self.decoder.io_binding()
        # get_outputs() follows the binding order: logits first.
        binding.bind_output("logits", "cpu")
        binding.bind_cpu_input("input_ids", input_ids.astype(np.int64))
        binding.bind_cpu_input("positions", positions.astype(np.int64))
        caches = {"past_k": self.k, "past_v": self.v}
        if cross is not None:
            caches.update(cross_k=cross[0], cross_v=cross[1])
            binding.bind_ortvalue_input("src_mask", cross[2])
        bind_layers(binding, caches, self.device)
        binding.bind_output("new_k", self.device)
        binding.bind_output("new_v", self.device)
        if cross is not None:
            binding.bind_output("cross_attention", self.device)
        self.decoder.run_with_iobinding(binding)
        logits, new_k, new_v = binding.get_outputs()[:3]
        at = positions.astype(np.int64)
        self.k, self.v = self._write(self.k, new_k, at), self._write(self.v, new_v, at)
        return np.asarray(logits.numpy())


def bound_greedy(
    model: BoundModel, sources: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy translation with the cache on the device; finished rows ride along (EOS fed)."""
    ids = model.manifest.special_ids
    src_ids, src_mask = pad_batch(sources, ids.pad_id)
    cross = model.encode(src_ids, src_mask)
    n = len(sources)
    model.start(n, bucket(max_new_tokens + 1))
    tokens = np.full((n, 1), ids.decoder_start_id, dtype=np.int64)
    results: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    for step in range(max_new_tokens):
        logits = model.step(tokens, np.full(n, step), cross)[:, -1]
        chosen = np.argmax(logits, axis=-1)
        for row in np.flatnonzero(~done):
            if chosen[row] == ids.eos_id:
                done[row] = True
            else:
                results[row].append(int(chosen[row]))
        if done.all():
            break
        tokens = np.where(done, ids.eos_id, chosen)[:, None]
    return results


def bound_generate(
    model: BoundModel, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation: one right-padded prefill call (T > 1), then single steps."""
    ids = model.manifest.special_ids
    batch, _ = pad_batch(prompts, ids.pad_id)
    n = len(prompts)
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    model.start(n, bucket(batch.shape[1] + max_new_tokens))
    logits = model.step(batch, np.zeros(n, dtype=np.int64))[np.arange(n), lengths - 1]
    results: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    for step in range(max_new_tokens):
        chosen = np.argmax(logits, axis=-1)
        for row in np.flatnonzero(~done):
            if chosen[row] == ids.eos_id:
                done[row] = True
            else:
                results[row].append(int(chosen[row]))
        if done.all() or step == max_new_tokens - 1:
            break
        tokens = np.where(done, ids.eos_id, chosen)[:, None]
        logits = model.step(tokens, lengths + step)[:, -1]
    return results


def bound_teacher_forced(
    model: BoundModel, sources: list[list[int]] | None, targets: list[list[int]]
) -> list[np.ndarray]:
    """Logits of each target fed one token per step (translator: with its source)."""
    ids = model.manifest.special_ids
    cross = None
    if sources is not None:
        src_ids, src_mask = pad_batch(sources, ids.pad_id)
        cross = model.encode(src_ids, src_mask)
    tgt, _ = pad_batch(targets, ids.pad_id)
    model.start(len(targets), bucket(tgt.shape[1]))
    steps = [
        model.step(tgt[:, t : t + 1], np.full(len(targets), t), cross)[:, 0]
        for t in range(tgt.shape[1])
    ]
    logits = np.stack(steps, axis=1).astype(np.float32)
    return [logits[i, : len(t)] for i, t in enumerate(targets)]


def time_steps(
    model: BoundModel, batch: int, source_len: int, capacity: int, steps: int
) -> dict[str, float]:
    """Median encoder latency and per-step decoder latency at one batch size."""
    rng = np.random.default_rng(0)
    vocab = model.manifest.vocab_size
    cross = None
    encode_ms = float("nan")
    if model.encoder is not None:
        src = rng.integers(4, vocab, (batch, source_len))
        mask = np.ones((batch, source_len), dtype=bool)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            cross = model.encode(src, mask)
            samples.append(time.perf_counter() - start)
        encode_ms = statistics.median(samples) * 1000
    model.start(batch, capacity)
    ids = rng.integers(4, vocab, (batch, 1))
    for step in range(3):  # warm-up
        model.step(ids, np.full(batch, step), cross)
    samples = []
    for step in range(steps):
        start = time.perf_counter()
        model.step(ids, np.full(batch, min(step, capacity - 1)), cross)
        samples.append(time.perf_counter() - start)
    step_ms = statistics.median(samples) * 1000
    return {
        "batch": batch,
        "encode_ms": encode_ms,
        "step_ms": step_ms,
        "tokens_per_s": batch / (step_ms / 1000),
    }


def run_check(
    version_dir: Path,
    variants: list[str],
    device: str,
    data: Path | None,
    verses: int,
    batches: list[int],
    steps: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    if device == "cuda":
        require_cuda()
    manifest = load_manifest(version_dir)
    report: dict[str, Any] = {
        "model": f"{manifest.name}/{manifest.version}",
        "device": device,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "machine": platform.platform(),
        "variants": {},
    }
    translation = manifest.task == "translation"
    sources: list[list[int]] = []
    references: list[str] = []
    sp = None
    if translation and data is not None and (data / "pairs.test.tsv").is_file():
        import csv

        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(version_dir / manifest.tokenizer.path))
        with (data / "pairs.test.tsv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))[:verses]
        eos = manifest.special_ids.eos_id
        limit = manifest.limits.max_input_tokens
        sources = [[*sp.encode(r["en"]), eos][:limit] for r in rows]
        references = [r["es"] for r in rows]
    else:
        rng = np.random.default_rng(0)
        special = manifest.special_ids
        sources = [
            ([] if translation else [special.bos_id])
            + [int(t) for t in rng.integers(4, manifest.vocab_size, int(rng.integers(4, 30)))]
            + ([special.eos_id] if translation else [])
            for _ in range(verses)
        ]
    # Reference: onnxruntime CPU fp32 (checked against PyTorch by `make parity`).
    cpu = OrtModel(version_dir, "fp32", manifest=manifest)
    n_logits = min(16, len(sources))
    logit_sources: list[list[int]] | None
    if translation:
        ref_tokens = greedy_translate(cpu, sources, max_new_tokens)
        logit_sources = sources[:n_logits]
        targets = [[manifest.special_ids.decoder_start_id, *t] for t in ref_tokens[:n_logits]]
    else:
        max_new_tokens = min(max_new_tokens, manifest.limits.max_positions - 30)
        ref_tokens = greedy_generate(cpu, sources, max_new_tokens)
        logit_sources = None
        targets = [[*p, *t] for p, t in zip(sources[:n_logits], ref_tokens, strict=False)]
    ref_logits = teacher_forced_logits(cpu, logit_sources, targets)
    decode = bound_greedy if translation else bound_generate
    for variant in variants:
        model = BoundModel(version_dir, manifest, variant, device)
        result: dict[str, Any] = {}
        got = bound_teacher_forced(model, logit_sources, targets)
        error = max(float(np.abs(g - r).max()) for g, r in zip(got, ref_logits, strict=True))
        tokens = [
            t
            for i in range(0, len(sources), 32)
            for t in decode(model, sources[i : i + 32], max_new_tokens)
        ]
        result.update(
            logits_max_abs=error,
            logits_ok=error <= GPU_LOGIT_TOLERANCE[variant],
            greedy_identical=sum(a == b for a, b in zip(tokens, ref_tokens, strict=True)),
            greedy_total=len(tokens),
        )
        if sp is not None:
            import sacrebleu

            hyps = [sp.decode(t) for t in tokens]
            refs = [sp.decode(t) for t in ref_tokens]
            result["bleu"] = sacrebleu.corpus_bleu(hyps, [references]).score
            result["bleu_cpu_fp32"] = sacrebleu.corpus_bleu(refs, [references]).score
            result["chrf"] = sacrebleu.corpus_chrf(hyps, [references]).score
        result["timings"] = [time_steps(model, b, 64, 128, steps) for b in batches]
        report["variants"][variant] = result
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU check: {report['model']} on {report['device']}",
        "",
        f"onnxruntime {report['onnxruntime']} ({', '.join(report['providers'])}), "
        f"{report['machine']}. Reference: onnxruntime CPU fp32. Cache on the device "
        "(IOBinding, the cache written on the device).",
        "",
        "| variant | logits max-abs | greedy identical | BLEU (CPU fp32) | batch | encode ms "
        "| step ms | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, result in report["variants"].items():
        err = result.get("logits_max_abs")
        greedy = (
            f"{result['greedy_identical']}/{result['greedy_total']}"
            if "greedy_total" in result
            else "—"
        )
        bleu = f"{result['bleu']:.2f} ({result['bleu_cpu_fp32']:.2f})" if "bleu" in result else "—"
        for timing in result["timings"]:
            encode = (
                "—" if timing["encode_ms"] != timing["encode_ms"] else f"{timing['encode_ms']:.2f}"
            )
            lines.append(
                f"| {variant} | {'—' if err is None else f'{err:.2e}'} | {greedy} | {bleu} | "
                f"{timing['batch']} | {encode} | {timing['step_ms']:.2f} | "
                f"{timing['tokens_per_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    version_dir: Annotated[Path, typer.Option(help="models/<name>/<version>")] = Path(
        "models/en-es/1"
    ),
    variants: Annotated[str, typer.Option(help="Comma list.")] = "fp16,fp32",
    device: Annotated[str, typer.Option(help="cuda, or cpu to test this script.")] = "cuda",
    data: Annotated[Path | None, typer.Option(help="Folder with pairs.test.tsv.")] = None,
    verses: Annotated[int, typer.Option(min=1)] = 200,
    batches: Annotated[str, typer.Option(help="Batch sizes to time.")] = "1,8,32,64",
    steps: Annotated[int, typer.Option(min=1, help="Timed decoder steps.")] = 50,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    out: Annotated[Path | None, typer.Option(help="Markdown report.")] = None,
    json_out: Annotated[Path | None, typer.Option(help="JSON report.")] = None,
) -> None:
    """Parity and timings of exported variants on the CUDA provider."""
    try:
        report = run_check(
            version_dir,
            [v.strip() for v in variants.split(",") if v.strip()],
            device,
            data,
            verses,
            [int(b) for b in batches.split(",")],
            steps,
            max_new_tokens,
        )
    except GpuUnavailable as error:
        typer.echo(f"gpu_check: {error}", err=True)
        raise typer.Exit(2) from error
    text = render(report)
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [v for v, r in report["variants"].items() if r.get("logits_ok") is False]
    if failed:
        typer.echo(f"gpu_check: logits beyond tolerance for {failed}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    sys.exit(app())

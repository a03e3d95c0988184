"""GPU benchmark for the device tool (H100/H200): `python -m loadtest.gpu_bench`.

Decoding a small Transformer is bound by launch and host overhead, not by the GPU, so
every figure is printed next to its roofline: the bytes one decode step must read (the
decoder's weights used per step, the output projection, the self- and cross-attention
caches) and write (logits) divided by this card's *measured* copy bandwidth. The gap
between a step's time and its roofline is what the engine leaves on the table.

Configs: `base` is Transformer-base with random weights (6+6 layers, d_model 512, 8 heads,
FFN 2048, vocab 32k, post-LN so it exports to Marian) so the GPU numbers mean something;
`en-es` is our trained translator when models/en-es/checkpoint exists. For each: PyTorch
eager (the reference decoder) in fp16, Hugging Face Marian `generate` fp16 on the same
weights, and the serving engine (service.engine, onnxruntime CUDA EP, fp16, IOBinding)
when onnxruntime has the CUDA provider (`make gpu-stage` stages it); then the bare decoder
step at batch 64 on fixed device buffers, plain and captured as a CUDA graph (what launch
overhead costs, and whether our graphs can be captured at all). The issue's target:
engine >= 10x Hugging Face generate fp16 at batch 64.

On the device tool: `make gpu-stage` here stages onnxruntime-gpu and the wheels the image
lacks, and lists the calls to make; the last runs loadtest/device/run.sh, which runs this
script among the other GPU checks:

    PYTHONPATH=$PWD:/root/ortgpu:/tmp/site python3 -m loadtest.gpu_bench --out $OUT/gpu_bench.json

then here: `python -m loadtest.gpu_bench --record docs/benchmarks.md --from-json FILE`.
A stage whose package is missing reports why and the others go on.

Sources are random ids of a fixed length and every sequence decodes a fixed number of new
tokens (random weights almost never emit EOS; token counts are what was generated), so
the engines do the same work. Bounded: each stage has a time budget; the whole script
is meant to finish in well under 10 minutes. Without CUDA it exits with status 2 and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.report import write_json
from loadtest.sections import replace_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN gpu-bench: output of `python -m loadtest.gpu_bench --record` -->"
END = "<!-- END gpu-bench -->"
FP16_BYTES = 2
HF_ANCHOR_TOKENS_S = 15_600  # serving-anchors.md: HF generate, H100, batch 64, fp16, 32 new


class NoCuda(RuntimeError):
    """This script measures a GPU; on a machine without one it refuses, saying why."""


@dataclass
class Device:
    """The GPU (fp16, CUDA EP), or the CPU for --cpu-dry-run (fp32; numbers meaningless)."""

    torch: Any
    cuda: bool

    @property
    def name(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def dtype(self) -> Any:
        return self.torch.float16 if self.cuda else self.torch.float32

    @property
    def variant(self) -> str:
        return "fp16" if self.cuda else "fp32"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def used_gib(self) -> float | None:
        if not self.cuda:
            return None
        free, total = self.torch.cuda.mem_get_info()
        return float((total - free) / 2**30)

    def release(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()


def require_device(cpu_dry_run: bool = False) -> Device:
    """torch with a CUDA device, or NoCuda naming what is missing."""
    try:
        import torch
    except ImportError as error:
        raise NoCuda("PyTorch is not installed; run this on the GPU device machine") from error
    if cpu_dry_run:
        return Device(torch, cuda=False)
    if not torch.cuda.is_available():
        raise NoCuda(
            "no CUDA device (torch.cuda.is_available() is False); this benchmark runs on the "
            "device tool's H100/H200: python -m loadtest.gpu_bench (or --cpu-dry-run to "
            "exercise it here with meaningless numbers)"
        )
    return Device(torch, cuda=True)


# --- shapes and the roofline ---------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What a decode step touches; from a TransformerConfig."""

    layers: int
    d_model: int
    d_ff: int
    vocab: int

    def weight_bytes_per_step(self, dtype_bytes: int = FP16_BYTES) -> int:
        """Decoder weights read by one step: self-attention (4 d^2), cross-attention query
        and output (2 d^2; its keys/values are cached per request), FFN (2 d d_ff), norms and
        biases, and the output projection (vocab x d)."""
        d, f = self.d_model, self.d_ff
        per_layer = 6 * d * d + 2 * d * f + 9 * d + f
        return (self.layers * per_layer + self.vocab * d + self.vocab) * dtype_bytes

    def cache_bytes_per_step(
        self, batch: int, cached: float, source: int, dtype_bytes: int = FP16_BYTES
    ) -> float:
        """Keys and values read by one step: self-attention over `cached` tokens and
        cross-attention over `source` tokens, every layer and row."""
        return self.layers * batch * (cached + source) * self.d_model * 2 * dtype_bytes

    def step_bytes(self, batch: int, cached: float, source: int) -> float:
        logits = batch * self.vocab * 4  # written in fp32 or read back: count 4 bytes
        return (
            self.weight_bytes_per_step() + self.cache_bytes_per_step(batch, cached, source) + logits
        )


def roofline_s(bytes_moved: float, bandwidth: float) -> float:
    return bytes_moved / bandwidth


def measure_bandwidth(dev: Device, gib: float = 1.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of repeats."""
    torch = dev.torch
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=dev.name)
    dst = torch.empty_like(src)
    dst.copy_(src)
    dev.sync()
    best = float("inf")
    for _ in range(repeats):
        if dev.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    del src, dst
    dev.release()
    return 2 * n * 4 / best


# --- results -------------------------------------------------------------------------------


@dataclass
class Figure:
    config: str
    engine: str
    batch: int
    status: str = "ok"
    reason: str = ""
    new_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    step_ms: float | None = None
    roofline_step_us: float | None = None
    step_bytes_mb: float | None = None
    gpu_mem_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.status != "ok":
            return (
                f"{self.config:6} {self.engine:22} b={self.batch:<4} {self.status}: {self.reason}"
            )
        off = (
            f", {self.step_ms * 1000 / self.roofline_step_us:.0f}x roofline"
            if self.step_ms and self.roofline_step_us
            else ""
        )
        return (
            f"{self.config:6} {self.engine:22} b={self.batch:<4} {self.tokens_per_s:10.0f} tok/s  "
            f"step {self.step_ms or 0:7.2f} ms | roofline {self.roofline_step_us or 0:6.1f} us "
            f"({self.step_bytes_mb or 0:.1f} MB/step){off}"
            + (f"  mem {self.gpu_mem_gib:.2f} GiB" if self.gpu_mem_gib is not None else "")
        )


@dataclass
class Settings:
    configs: list[str]
    batches: list[int]
    hf_batches: list[int]
    source_len: int = 32
    new_tokens: int = 32
    repeats: int = 3
    work_dir: Path | None = None  # checkpoints and exports; a temp dir removed at the end
    # Rewritten after every figure, so a run cut short (the device call's time) keeps what
    # it measured; `--record --from-json` turns it into the GPU section.
    partial_out: Path | None = None
    command: str = "python -m loadtest.gpu_bench"


@contextlib.contextmanager
def stage(
    figures: list[Figure],
    config: str,
    engine: str,
    batch: int,
    saved: Callable[[], None] | None = None,
) -> Iterator[Figure]:
    """Run one measurement; a failure becomes a figure with its reason, not a crash.
    `saved` runs once the figure is in `figures` (the partial result's writer)."""
    fig = Figure(config, engine, batch)
    try:
        yield fig
    except Skip as skip:
        fig.status, fig.reason = "skipped", str(skip)
    except Exception as error:
        fig.status, fig.reason = "failed", f"{type(error).__name__}: {error}"[:300]
        traceback.print_exc(file=sys.stderr)
    figures.append(fig)
    print(fig.line(), flush=True)
    if saved is not None:
        saved()


class Skip(Exception):
    pass


# --- models --------------------------------------------------------------------------------


def base_config(tiny: bool = False) -> Any:
    """Transformer-base (random weights); `tiny` is a toy of the same layout for dry runs."""
    from transformer.config import TransformerConfig

    if tiny:
        return TransformerConfig(
            arch="encoder-decoder",
            vocab_size=1000,
            d_model=64,
            n_heads=4,
            n_encoder_layers=2,
            n_decoder_layers=2,
            d_ff=128,
            dropout=0.0,
            max_positions=128,
            norm_first=False,
            final_norm=False,
            activation="relu",
            positional="sinusoidal",
        )
    return TransformerConfig(
        arch="encoder-decoder",
        vocab_size=32000,
        d_model=512,
        n_heads=8,
        n_encoder_layers=6,
        n_decoder_layers=6,
        d_ff=2048,
        dropout=0.0,
        max_positions=512,
        norm_first=False,
        final_norm=False,
        activation="relu",
        positional="sinusoidal",
    )


def synthetic_tokenizer(path: Path, vocab: int) -> Path:
    """A SentencePiece model with `vocab` placeholder pieces (ids 0-3 pad/unk/bos/eos), so a
    random-weight checkpoint exports and serves without training a tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    proto = sp_pb.ModelProto()  # type: ignore[attr-defined]
    proto.trainer_spec.model_type = 1  # UNIGRAM
    proto.trainer_spec.vocab_size = vocab
    proto.trainer_spec.pad_id, proto.trainer_spec.unk_id = 0, 1
    proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 2, 3
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    for piece, kind in (("<pad>", 3), ("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        entry = proto.pieces.add()
        entry.piece, entry.type, entry.score = piece, kind, 0.0
    for i in range(4, vocab):
        entry = proto.pieces.add()
        entry.piece, entry.type, entry.score = f"\u2581w{i}", 1, -float(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def checkpoint_for(name: str, work: Path) -> Path:
    """models/<name>/checkpoint as is, or a random Transformer-base ("base"/"tiny") one."""
    if name not in ("base", "tiny"):
        path = ROOT / "models" / name / "checkpoint"
        if not (path / "config.json").is_file():
            raise Skip(f"no checkpoint at {path}")
        return path
    out = work / name / "checkpoint"
    if (out / "config.json").is_file():
        return out
    import torch

    from transformer.checkpoint import save_checkpoint
    from transformer.model import build_model

    torch.manual_seed(0)
    config = base_config(tiny=name == "tiny")
    try:
        tokenizer: Path | None = synthetic_tokenizer(
            work / name / "tokenizer.model", config.vocab_size
        )
    except ImportError as error:  # HF and engine stages will say they need it
        print(f"# no tokenizer for {name}: {error}", flush=True)
        tokenizer = None
    return save_checkpoint(build_model(config), out, tokenizer)


def random_sources(n: int, length: int, vocab: int, eos: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length - 1)] + [eos] for _ in range(n)]


def _generated(hyp: Any) -> int:
    """Tokens a hypothesis took steps for: its tokens plus the EOS that ended it, if any."""
    tokens = getattr(hyp, "token_ids", None)
    if tokens is None:
        tokens = hyp.tokens
    return len(tokens) + (1 if str(hyp.finish_reason) in ("eos", "FinishReason.EOS") else 0)


# --- stages --------------------------------------------------------------------------------


def bench_torch(dev: Device, fig: Figure, checkpoint: Path, s: Settings, bw: float) -> None:
    """Reference decoder (transformer.decoding.translate) in fp16 on the GPU."""
    from transformer.checkpoint import load_checkpoint
    from transformer.decoding import DecodingOptions, translate
    from transformer.model import EncoderDecoder

    torch = dev.torch
    model = load_checkpoint(checkpoint, device=dev.name).to(dev.dtype).eval()
    if not isinstance(model, EncoderDecoder):
        raise Skip(f"{checkpoint} is not a translator")
    config = model.config
    srcs = random_sources(fig.batch, s.source_len, config.vocab_size, config.eos_id)
    options = DecodingOptions(max_new_tokens=s.new_tokens)
    with torch.inference_mode():
        translate(model, srcs, options)  # warm-up
        dev.sync()
        dev.reset_peak()
        best, tokens = float("inf"), 0
        for _ in range(s.repeats):
            t = time.perf_counter()
            out = translate(model, srcs, options)
            dev.sync()
            elapsed = time.perf_counter() - t
            if elapsed < best:
                best, tokens = elapsed, sum(_generated(h[0]) for h in out)
    _fill(fig, config, tokens, best, s, bw)
    fig.gpu_mem_gib = dev.peak_gib()
    del model
    dev.release()


def bench_hf(dev: Device, fig: Figure, checkpoint: Path, s: Settings, bw: float) -> None:
    """transformers MarianMTModel.generate, fp16, greedy, exactly new_tokens per row."""
    try:
        from transformers import MarianMTModel
    except ImportError as error:
        raise Skip(f"transformers not installed ({error.name})") from error
    from export.huggingface import export_marian
    from transformer.config import TransformerConfig

    config = TransformerConfig.load(checkpoint / "config.json")
    marian = Path(s.work_dir or tempfile.gettempdir()) / f"marian-{checkpoint.parent.name}"
    if not (marian / "config.json").is_file():
        export_marian(checkpoint, marian)
    torch = dev.torch
    model: Any = MarianMTModel.from_pretrained(str(marian), dtype=dev.dtype)
    model = model.to(dev.name).eval()
    srcs = random_sources(fig.batch, s.source_len, config.vocab_size, config.eos_id)
    ids = torch.tensor(srcs, device=dev.name)
    mask = torch.ones_like(ids)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=s.new_tokens,
        min_new_tokens=s.new_tokens,
        num_beams=1,
        do_sample=False,
        decoder_start_token_id=config.decoder_start_id,
        pad_token_id=config.pad_id,
    )
    with torch.inference_mode():
        model.generate(**kwargs)
        dev.sync()
        dev.reset_peak()
        best = float("inf")
        for _ in range(s.repeats):
            t = time.perf_counter()
            out = model.generate(**kwargs)
            dev.sync()
            best = min(best, time.perf_counter() - t)
    tokens = int((out[:, 1:] != config.pad_id).sum())
    _fill(fig, config, tokens, best, s, bw)
    fig.gpu_mem_gib = dev.peak_gib()
    del model
    dev.release()


def export_variant(checkpoint: Path, work: Path, variant: str) -> Path:
    """models-style version folder with one variant (export.onnx_export): fp16 for the GPU."""
    out = work / f"repo-{checkpoint.parent.name}-{variant}" / checkpoint.parent.name / "1"
    if (out / "manifest.json").is_file():
        return out
    from export.onnx_export import export_checkpoint

    t = time.perf_counter()
    export_checkpoint(
        checkpoint,
        out,
        [variant],
        exporter="torchscript",
        source_language="en",
        target_language="es",
    )
    took = time.perf_counter() - t
    print(f"# exported {checkpoint.parent.name} {variant} in {took:.0f} s", flush=True)
    return out


def engine_available(dev: Device) -> str | None:
    """Why the engine stage cannot run here (None: it can)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed"
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    if dev.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            "(stage onnxruntime-gpu: make gpu-stage)"
        )
    return None


def bench_engine(
    dev: Device, fig: Figure, version_dir: Path, s: Settings, bw: float, cuda_graphs: bool = True
) -> None:
    """service.engine on the CUDA EP (fp16, IOBinding): one static batch of `batch` rows,
    its decode steps replayed as CUDA graphs (the default) or run plainly."""
    why = engine_available(dev)
    if why:
        raise Skip(why)
    from export.manifest import load_manifest
    from service.domain import DecodingParams, SequenceRequest, Task
    from service.engine import BatchItem, Engine, EngineOptions
    from transformer.config import TransformerConfig

    manifest = load_manifest(version_dir, variants=[dev.variant])
    config = TransformerConfig.from_dict(dict(manifest.config))
    engine = Engine(
        version_dir,
        manifest,
        EngineOptions(
            provider="cuda" if dev.cuda else "cpu",
            cpu_variant="fp32",
            max_batch_size=fig.batch,
            io_binding=True,  # the device path, on the CPU too (dry runs)
            cuda_graphs=cuda_graphs,
        ),
    )
    srcs = random_sources(fig.batch, s.source_len, config.vocab_size, config.eos_id)
    params = DecodingParams(max_new_tokens=s.new_tokens)
    batch = engine.new_batch()  # one batch throughout: its step graphs are captured once

    outputs: dict[Any, list[int]] = {}

    def run_once() -> tuple[int, float, list[tuple[float, float]]]:
        items = [
            BatchItem(i, SequenceRequest(Task.TRANSLATION, "", params), src)
            for i, src in enumerate(srcs)
        ]
        t = time.perf_counter()
        batch.add(items)
        tokens, steps = 0, []
        while len(batch):
            out = batch.step()
            steps.append((out.seconds, out.seconds - out.run_seconds))
            tokens += sum(_generated(r.hypotheses[0]) for _, r in out.finished)
            outputs.update((key, list(r.hypotheses[0].token_ids)) for key, r in out.finished)
        return tokens, time.perf_counter() - t, steps

    run_once()  # the warm-up: the shapes timed below, and only those (engine.warmup would
    # run every bucket up to max_positions, tens of seconds per batch size on a GPU)
    best: tuple[int, float, list[tuple[float, float]]] | None = None
    for _ in range(s.repeats):
        result = run_once()
        if best is None or result[1] < best[1]:
            best = result
    assert best is not None
    tokens, seconds, steps = best
    _fill(fig, config, tokens, seconds, s, bw)
    if steps:
        # A step's time and its host share: what it spent outside onnxruntime's runs
        # (bookkeeping, copies, Python), which graphs cannot shorten.
        for key, values in (
            ("engine_step_p50_ms", sorted(total for total, _ in steps)),
            ("engine_host_p50_ms", sorted(host for _, host in steps)),
        ):
            fig.extra[key] = values[len(values) // 2] * 1000
    fig.gpu_mem_gib = dev.used_gib()
    fig.extra["provider"] = engine.provider
    fig.extra["cuda_graphs"] = bool(engine.cuda_graphs)  # still on at the end
    # Every run decodes the same sources: the tokens of the last one, for comparing the
    # engine with and without graphs (greedy on the same weights: they must be equal).
    fig.extra["outputs_sha256"] = hashlib.sha256(
        json.dumps([outputs[i] for i in range(len(srcs))]).encode()
    ).hexdigest()
    engine.close()  # its device memory back now, before the next figure's engine loads


PROBE_CACHE = 64  # cache length of the decoder-step probe
PROBE_RUNS = 50


def probe_decoder_step(
    dev: Device, fig: Figure, version_dir: Path, s: Settings, bw: float, cuda_graph: bool
) -> None:
    """The bare decoder step at one fixed shape (fig.batch rows, cache PROBE_CACHE, source
    s.source_len), every input and output bound to a fixed device buffer: plain IOBinding
    runs, or (cuda_graph) onnxruntime's CUDA graph capture and replay of the same step, the
    way to cut per-kernel launch cost. Whether capture works on our graphs at all (every
    node on the CUDA EP, no shape computation on the host) is itself the finding."""
    if cuda_graph and not dev.cuda:
        raise Skip("CUDA graphs need a CUDA device")
    why = engine_available(dev)
    if why:
        raise Skip(why)
    import numpy as np
    import onnxruntime as ort

    from export.manifest import load_manifest
    from transformer.config import TransformerConfig

    manifest = load_manifest(version_dir, variants=[dev.variant])
    config = TransformerConfig.from_dict(dict(manifest.config))
    path = version_dir / manifest.graph(dev.variant, "decoder").path
    layers, heads = config.n_decoder_layers, config.n_heads
    dim = config.d_model // heads
    rows, cache, source = fig.batch, PROBE_CACHE, s.source_len
    dtype = np.float16 if dev.cuda else np.float32
    device = "cuda" if dev.cuda else "cpu"
    options: dict[str, str] = {"device_id": "0"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    providers: list[Any] = (
        [("CUDAExecutionProvider", options)] if dev.cuda else ["CPUExecutionProvider"]
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=providers)
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "input_ids": np.full((rows, 1), config.bos_id, dtype=np.int64),
        "positions": np.full(rows, cache // 2, dtype=np.int64),
        "src_mask": np.ones((rows, source), dtype=bool),
    }
    for i in range(layers):
        for name, length in (("past", cache), ("cross", source)):
            for kv in "kv":
                dims = (rows, heads, length, dim)
                arrays[f"{name}_{kv}_{i}"] = (rng.standard_normal(dims) * 0.1).astype(dtype)
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(arrays)
    if missing:
        raise RuntimeError(f"decoder inputs this probe does not know: {sorted(missing)}")
    out_shapes = {
        "logits": (rows, 1, config.vocab_size),
        "new_k": (layers, rows, heads, 1, dim),
        "new_v": (layers, rows, heads, 1, dim),
        "cross_attention": (rows, 1, source),
    }
    io = session.io_binding()
    keep = []  # the fixed buffers must outlive every replay
    for name in wanted:
        value = ort.OrtValue.ortvalue_from_numpy(arrays[name], device, 0)
        keep.append(value)
        io.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        value = ort.OrtValue.ortvalue_from_shape_and_type(
            list(out_shapes[out.name]), dtype, device, 0
        )
        keep.append(value)
        io.bind_ortvalue_output(out.name, value)
    session.run_with_iobinding(io)  # with cuda_graph: the warm-up run, then the capture
    session.run_with_iobinding(io)
    t = time.perf_counter()
    for _ in range(PROBE_RUNS):
        session.run_with_iobinding(io)
    dev.sync()
    seconds = time.perf_counter() - t
    _figures(fig, config, rows * PROBE_RUNS, seconds, PROBE_RUNS, cache, source, bw)
    fig.extra["shape"] = {"rows": rows, "cache": cache, "source": source}
    fig.gpu_mem_gib = dev.used_gib()


def _fill(fig: Figure, config: Any, tokens: int, seconds: float, s: Settings, bw: float) -> None:
    """A generation of s.new_tokens steps: its roofline at the mean cached length."""
    _figures(fig, config, tokens, seconds, s.new_tokens, (s.new_tokens + 1) / 2, s.source_len, bw)


def _figures(
    fig: Figure,
    config: Any,
    tokens: int,
    seconds: float,
    steps: int,
    cached: float,
    source: int,
    bw: float,
) -> None:
    """tokens/s, time per step, and the step's roofline with `cached` positions cached."""
    shape = Shape(config.n_decoder_layers, config.d_model, config.d_ff, config.vocab_size)
    fig.new_tokens, fig.seconds, fig.steps = tokens, seconds, steps
    fig.step_ms = seconds / max(steps, 1) * 1000
    step_bytes = shape.step_bytes(fig.batch, cached, source)
    fig.step_bytes_mb = step_bytes / 1e6
    fig.roofline_step_us = roofline_s(step_bytes, bw) * 1e6


# --- main ----------------------------------------------------------------------------------


def run(s: Settings, cpu_dry_run: bool = False) -> dict[str, Any]:
    dev = require_device(cpu_dry_run)
    if s.work_dir is not None:
        return _run(s, dev)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        s.work_dir = Path(tmp)
        try:
            return _run(s, dev)
        finally:
            s.work_dir = None


def _run(s: Settings, dev: Device) -> dict[str, Any]:
    assert s.work_dir is not None
    torch = dev.torch
    if dev.cuda:
        props = torch.cuda.get_device_properties(0)
        device_name, memory_gib = props.name, round(props.total_memory / 2**30, 1)
    else:
        device_name, memory_gib = "CPU (dry run: numbers mean nothing)", 0.0
    bw = measure_bandwidth(dev, gib=1.0 if dev.cuda else 0.25)
    header = {
        "device": device_name,
        "memory_gib": memory_gib,
        "measured_bandwidth_gb_s": round(bw / 1e9, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {k: str(v) for k, v in s.__dict__.items()},
    }
    with contextlib.suppress(Exception):
        import onnxruntime as ort

        header["onnxruntime"] = ort.__version__
    with contextlib.suppress(Exception):
        import transformers

        header["transformers"] = transformers.__version__
    print(
        f"# {device_name}, {memory_gib} GiB, copy bandwidth {bw / 1e9:.0f} GB/s",
        flush=True,
    )
    print(
        f"# source {s.source_len} tokens, {s.new_tokens} new tokens per row, fp16, greedy; "
        "roofline = bytes per decode step / measured bandwidth",
        flush=True,
    )
    figures: list[Figure] = []

    def save() -> None:
        if s.partial_out is not None:
            partial = {
                "header": header,
                "figures": [_fig_json(f) for f in figures],
                "summary": ratios(figures),
                "partial": True,
                "command": f"{s.command} (cut short: the figures measured before it ended)",
            }
            write_json(s.partial_out, partial)

    for name in s.configs:
        try:
            checkpoint = checkpoint_for(name, s.work_dir)
        except Skip as skip:
            print(f"{name:6} skipped: {skip}", flush=True)
            continue
        for batch in s.batches:
            with stage(figures, name, "pytorch eager", batch, save) as fig:
                bench_torch(dev, fig, checkpoint, s, bw)
        for batch in s.hf_batches:
            with stage(figures, name, "hf generate", batch, save) as fig:
                bench_hf(dev, fig, checkpoint, s, bw)
        why = engine_available(dev)
        version_dir: Path | None = None
        export_error: Exception | None = None
        for batch in s.batches:
            with stage(figures, name, "serving engine", batch, save) as fig:
                if why:
                    raise Skip(why)
                if export_error is not None:
                    raise Skip(f"export failed: {export_error}")
                try:
                    version_dir = version_dir or export_variant(checkpoint, s.work_dir, dev.variant)
                except Exception as error:
                    export_error = error
                    raise
                bench_engine(dev, fig, version_dir, s, bw)
        probe_batch = 64 if 64 in s.batches else max(s.batches)
        with stage(figures, name, "serving engine, no CUDA graphs", probe_batch, save) as fig:
            if why or version_dir is None:
                raise Skip(why or "no exported version (see the serving engine rows)")
            bench_engine(dev, fig, version_dir, s, bw, cuda_graphs=False)
        for engine, graph in (("decoder step", False), ("decoder step, CUDA graph", True)):
            with stage(figures, name, engine, probe_batch, save) as fig:
                if why or version_dir is None:
                    raise Skip(why or "no exported version (see the serving engine rows)")
                probe_decoder_step(dev, fig, version_dir, s, bw, graph)
    summary = ratios(figures)
    for line in summary:
        print(f"# {line}", flush=True)
    return {"header": header, "figures": [_fig_json(f) for f in figures], "summary": summary}


def ratios(figures: list[Figure]) -> list[str]:
    """engine vs HF at each batch both ran (the issue's GPU target is >= 10x at batch 64)."""
    lines = []
    ok = {(f.config, f.engine, f.batch): f for f in figures if f.status == "ok"}
    for (config, engine, batch), hf in sorted(ok.items()):
        if engine != "hf generate":
            continue
        line = f"{config} b={batch}: HF generate {hf.tokens_per_s:.0f} tok/s"
        if batch == 64 and config == "base":
            line += f" (anchor: {HF_ANCHOR_TOKENS_S} on an H100)"
        for other in ("serving engine", "serving engine, no CUDA graphs", "pytorch eager"):
            f = ok.get((config, other, batch))
            if f:
                target = " (target >= 10x)" if other == "serving engine" and batch == 64 else ""
                line += f"; {other} {f.tokens_per_s / hf.tokens_per_s:.2f}x{target}"
        lines.append(line)
    for (config, engine, batch), f in sorted(ok.items()):
        if engine.startswith("serving engine") and "engine_host_p50_ms" in f.extra:
            lines.append(
                f"{config} b={batch}: {engine} step p50 {f.extra['engine_step_p50_ms']:.3f} ms, "
                f"of which outside onnxruntime {f.extra['engine_host_p50_ms']:.3f} ms"
            )
    for (config, engine, batch), plain in sorted(ok.items()):
        graphs = ok.get((config, "serving engine", batch))
        if engine == "serving engine, no CUDA graphs" and graphs is not None:
            same = graphs.extra.get("outputs_sha256") == plain.extra.get("outputs_sha256")
            lines.append(
                f"{config} b={batch}: serving engine with CUDA graphs "
                f"{graphs.tokens_per_s / plain.tokens_per_s:.2f}x without; "
                f"same tokens: {'yes' if same else 'NO'}"
            )
    return lines


def _fig_json(f: Figure) -> dict[str, Any]:
    data = dict(f.__dict__)
    data["tokens_per_s"] = f.tokens_per_s
    return data


def record(path: Path, result: dict[str, Any], command: str) -> None:
    """Write the result as the GPU section of docs/benchmarks.md (the rest is kept)."""
    h = result["header"]
    lines = [
        BEGIN,
        "## GPU benchmark",
        "",
        f"{h['device']} ({h['memory_gib']} GiB), measured copy bandwidth "
        f"{h['measured_bandwidth_gb_s']} GB/s; torch {h['torch']} (CUDA {h['cuda']}), "
        f"onnxruntime {h.get('onnxruntime', '–')}, transformers {h.get('transformers', '–')}.",
        "",
        "| config | engine | batch | tokens/s | ms/step | roofline µs/step | MB/step "
        "| × roofline | GPU mem GiB | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for f in result["figures"]:
        ok = f["status"] == "ok"
        if ok and f["engine"] == "serving engine" and not f["extra"].get("cuda_graphs", True):
            f = {**f, "reason": "(its CUDA graphs were off or fell back: see the log)"}
        times = (
            f"{f['step_ms'] * 1000 / f['roofline_step_us']:.0f}"
            if ok and f["roofline_step_us"]
            else "–"
        )
        lines.append(
            f"| {f['config']} | {f['engine']} | {f['batch']} "
            f"| {f['tokens_per_s']:.0f} | {f['step_ms'] or 0:.2f} "
            f"| {f['roofline_step_us'] or 0:.1f} | {f['step_bytes_mb'] or 0:.1f} | {times} "
            f"| {(f['gpu_mem_gib'] or 0):.2f} | {f['status']} {f['reason'][:120]} |"
        )
    lines += ["", *[f"- {s}" for s in result["summary"]], "", f"Reproduce: `{command}`", END]
    replace_section(path, "\n".join(lines), BEGIN, END)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m loadtest.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--configs", default="base,en-es", help="base and/or a model name")
    parser.add_argument("--batches", default="1,64,256", help="batch sizes (torch, engine)")
    parser.add_argument("--hf-batches", default="1,64", help="batch sizes for HF generate")
    parser.add_argument("--source-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result [default: $OUT/gpu_bench.json when $OUT is set]",
    )
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        help="update this Markdown file's GPU section (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="exercise every stage on the CPU in fp32 (tests; the numbers mean nothing)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="do not run: record a result JSON written on the device (with --record)",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        if args.record is None:
            parser.error("--from-json needs --record FILE")
        saved = json.loads(args.from_json.read_text())
        record(args.record, saved, saved.get("command", "python -m loadtest.gpu_bench"))
        return 0
    out = args.out or (
        Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    # Quoted as a shell reads it: an empty value (--hf-batches "") or a path with a space
    # must survive, or the recorded command does not run.
    command = shlex.join(
        ["python", "-m", "loadtest.gpu_bench", *(sys.argv[1:] if argv is None else argv)]
    )
    settings = Settings(
        configs=[c.strip() for c in args.configs.split(",") if c.strip()],
        batches=_ints(args.batches),
        hf_batches=_ints(args.hf_batches),
        source_len=args.source_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        partial_out=out,
        command=command,
    )
    start = time.perf_counter()
    try:
        result = run(settings, cpu_dry_run=args.cpu_dry_run)
    except NoCuda as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result["seconds"] = time.perf_counter() - start
    result["command"] = command
    if out is not None:
        write_json(out, result)
    if args.record is not None:
        record(args.record, result, command)
    print(f"# done in {result['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

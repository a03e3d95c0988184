"""The benchmark's in-process engines, one per subprocess: `python -m loadtest.baselines`.

Each phase decodes the same English verses greedily with the same max_new_tokens and
thread count, and reports tokens/s, latency percentiles, its own peak RSS (VmHWM, which is
why every phase is a fresh process) and its outputs, so the orchestrator (loadtest.bench)
can check that the engines agree with the PyTorch reference before comparing speeds.

Phases:
  prepare   Marian export (export.huggingface.export_marian) and CTranslate2 conversion;
            kept apart so that their torch/transformers memory is not charged to a phase.
  pytorch   transformer.decoding.translate, one request at a time (the naive baseline).
  hf        transformers MarianMTModel.generate on the exported weights, batched.
  ct2       CTranslate2 Translator on the converted weights, batched (sorted internally).
  ort       onnxruntime offline in static batches, no server (export.runtime's reference
            greedy loop).
  engine    the serving engine (service.engine) offline, rows refilled every step, no
            server: the ceiling the served path is held to (served >= 0.9x of it).

Token counts exclude EOS for every engine, like the service's usage.output_tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.report import percentile

PHASES: tuple[str, ...] = ("prepare", "pytorch", "hf", "ct2", "ort", "engine")


@dataclass
class PhaseConfig:
    """Everything a phase needs; serialised to JSON for the subprocess."""

    checkpoint: str
    version_dir: str
    variant: str
    texts: list[str]
    max_new_tokens: int
    batch_size: int
    threads: int
    budget_s: float
    work_dir: str

    @classmethod
    def load(cls, path: Path) -> PhaseConfig:
        return cls(**json.loads(path.read_text()))


@dataclass
class PhaseResult:
    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    requests: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    latency_unit: str = "request"  # request | batch
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    peak_rss_bytes: int | None = None
    gpu_peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    # index into PhaseConfig.texts -> output token ids (without EOS)
    outputs: dict[int, list[int]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_s"] = self.tokens_per_s
        data["requests_per_s"] = self.requests / self.seconds if self.seconds > 0 else 0.0
        data["outputs"] = {str(k): v for k, v in self.outputs.items()}
        return data


class Skip(Exception):
    """An optional peer that cannot run here; the reason goes in the table."""


def peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _tokenizer(cfg: PhaseConfig) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(Path(cfg.checkpoint) / "tokenizer.model"))


def _config(cfg: PhaseConfig) -> Any:
    from transformer.config import TransformerConfig

    return TransformerConfig.load(Path(cfg.checkpoint) / "config.json")


def sources(cfg: PhaseConfig) -> list[list[int]]:
    """Token ids of each text followed by EOS, as the service encodes translator inputs."""
    sp = _tokenizer(cfg)
    eos = _config(cfg).eos_id
    return [[*sp.encode(t), eos] for t in cfg.texts]


def length_batches(srcs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped in batches of similar source length (what offline engines do)."""
    order = sorted(range(len(srcs)), key=lambda i: (len(srcs[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_batches(
    result: PhaseResult,
    srcs: Sequence[Sequence[int]],
    batches: Sequence[Sequence[int]],
    decode: Callable[[list[list[int]]], list[list[int]]],
    budget_s: float,
) -> None:
    """Time decode() over batches until the budget is spent; fill the result."""
    latencies: list[float] = []
    start = time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        outs = decode([list(srcs[i]) for i in batch])
        latencies.append(time.perf_counter() - t)
        for i, out in zip(batch, outs, strict=True):
            result.outputs[i] = out
            result.output_tokens += len(out)
        result.requests += len(batch)
        if time.perf_counter() - start > budget_s:
            result.notes.append(f"stopped at the {budget_s:g} s budget")
            break
    result.seconds = time.perf_counter() - start
    result.latency_p50_s = percentile(latencies, 50)
    result.latency_p99_s = percentile(latencies, 99)


def _strip(ids: Sequence[int], eos: int, pad: int | None = None) -> list[int]:
    out: list[int] = []
    for t in ids:
        if t == eos or (pad is not None and t == pad):
            break
        out.append(int(t))
    return out


# --- phases --------------------------------------------------------------------------------


def phase_prepare(cfg: PhaseConfig, result: PhaseResult) -> None:
    """Export Marian (for transformers) and convert it for CTranslate2, recording skips."""
    work = Path(cfg.work_dir)
    status: dict[str, str] = {}
    try:
        from export.huggingface import export_marian

        export_marian(cfg.checkpoint, work / "marian")
        status["marian"] = "ok"
    except Exception as error:
        status["marian"] = f"Marian export failed: {error}"
    if status["marian"] == "ok":
        try:
            convert_ct2(work / "marian", work / "ct2")
            status["ct2"] = "ok"
        except ImportError as error:
            status["ct2"] = f"ctranslate2 not installed ({error.name})"
        except Exception as error:
            status["ct2"] = f"CTranslate2 conversion failed: {type(error).__name__}: {error}"
    else:
        status["ct2"] = status["marian"]
    (work / "prepared.json").write_text(json.dumps(status, indent=2))
    result.notes = [f"{k}: {v}" for k, v in status.items()]


def convert_ct2(marian_dir: Path, out_dir: Path) -> None:
    """CTranslate2's own Transformers converter, told our decoder-start convention.

    Its stock Marian loader assumes Marian's conventions (decoder starts from a zero
    embedding, last id is <pad> and is dropped); ours start from decoder_start_id and keep
    every id. The BART loader it derives from does exactly that, so we convert with the
    Marian loader's layout (post-LN, no embedding norm) and the BART loader's start token
    and vocabulary: the same weights, the same ids, the same greedy decisions.
    """
    from ctranslate2.converters import TransformersConverter
    from ctranslate2.converters import transformers as ct2_tf

    class ExactMarianLoader(ct2_tf.MarianMTLoader):  # type: ignore[misc,name-defined]
        def get_model_spec(self, model: Any) -> Any:
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return ct2_tf.BartLoader.get_model_spec(self, model)

        def set_config(self, config: Any, model: Any, tokenizer: Any) -> None:
            ct2_tf.BartLoader.set_config(self, config, model, tokenizer)
            if config.bos_token is None:  # MarianTokenizer has no bos token; our config does
                config.bos_token = tokenizer.convert_ids_to_tokens(model.config.bos_token_id)

        def set_decoder(self, spec: Any, decoder: Any) -> None:
            spec.start_from_zero_embedding = False
            ct2_tf.BartLoader.set_decoder(self, spec, decoder)

        def get_vocabulary(self, model: Any, tokenizer: Any) -> Any:
            return ct2_tf.BartLoader.get_vocabulary(self, model, tokenizer)

    loaders = ct2_tf._MODEL_LOADERS
    stock = loaders.get("MarianConfig")
    loaders["MarianConfig"] = ExactMarianLoader()
    try:
        TransformersConverter(str(marian_dir)).convert(str(out_dir), quantization=None, force=True)
    finally:
        if stock is not None:
            loaders["MarianConfig"] = stock


def phase_pytorch(cfg: PhaseConfig, result: PhaseResult) -> None:
    """Eager PyTorch reference decoder, one request at a time (no batching at all)."""
    import torch

    from transformer.checkpoint import load_checkpoint
    from transformer.decoding import DecodingOptions, translate
    from transformer.model import EncoderDecoder

    torch.set_num_threads(cfg.threads)
    model = load_checkpoint(cfg.checkpoint)
    assert isinstance(model, EncoderDecoder)
    options = DecodingOptions(max_new_tokens=cfg.max_new_tokens)
    srcs = sources(cfg)

    def decode(batch: list[list[int]]) -> list[list[int]]:
        with torch.inference_mode():
            return [h[0].tokens for h in translate(model, batch, options)]

    decode([srcs[0]])  # warm-up
    run_batches(result, srcs, [[i] for i in range(len(srcs))], decode, cfg.budget_s)


def phase_hf(cfg: PhaseConfig, result: PhaseResult) -> None:
    """transformers generate (greedy) on the Marian export of the same checkpoint."""
    marian = Path(cfg.work_dir) / "marian"
    prepared = _prepared(cfg).get("marian", "prepare phase did not run")
    if prepared != "ok":
        raise Skip(prepared)
    try:
        import torch
        from transformers import MarianMTModel
    except ImportError as error:
        raise Skip(f"transformers not installed ({error.name})") from error
    torch.set_num_threads(cfg.threads)
    model = MarianMTModel.from_pretrained(str(marian)).eval()
    conf = _config(cfg)
    srcs = sources(cfg)

    def decode(batch: list[list[int]]) -> list[list[int]]:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), conf.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg.max_new_tokens,
                num_beams=1,
                do_sample=False,
                decoder_start_token_id=conf.decoder_start_id,
                eos_token_id=conf.eos_id,
                pad_token_id=conf.pad_id,
            )
        # Row = [decoder_start, tokens..., eos, pad...]
        return [_strip(row[1:].tolist(), conf.eos_id) for row in out]

    decode([srcs[0]])
    result.latency_unit = "batch"
    run_batches(result, srcs, length_batches(srcs, cfg.batch_size), decode, cfg.budget_s)


def phase_ct2(cfg: PhaseConfig, result: PhaseResult) -> None:
    """CTranslate2 greedy decoding at the run's precision (float32, or int8 with --variant
    int8), same threads; it sorts by length itself."""
    prepared = _prepared(cfg).get("ct2", "prepare phase did not run")
    if prepared != "ok":
        raise Skip(prepared)
    try:
        import ctranslate2
    except ImportError as error:
        raise Skip(f"ctranslate2 not installed ({error.name})") from error
    translator = ctranslate2.Translator(
        str(Path(cfg.work_dir) / "ct2"),
        device="cpu",
        compute_type="int8" if cfg.variant == "int8" else "float32",
        inter_threads=1,
        intra_threads=cfg.threads,
    )
    sp = _tokenizer(cfg)
    srcs = sources(cfg)

    def decode(batch: list[list[int]]) -> list[list[int]]:
        tokens = [[sp.id_to_piece(i) for i in s] for s in batch]
        out = translator.translate_batch(
            tokens,
            max_batch_size=cfg.batch_size,
            batch_type="examples",
            beam_size=1,
            max_decoding_length=cfg.max_new_tokens,
        )
        return [[sp.piece_to_id(p) for p in r.hypotheses[0]] for r in out]

    decode([srcs[0]])
    result.latency_unit = "batch"
    # Handing CTranslate2 several batches at once lets it sort them, as it is meant to run.
    run_batches(result, srcs, length_batches(srcs, cfg.batch_size), decode, cfg.budget_s)


def phase_ort(cfg: PhaseConfig, result: PhaseResult) -> None:
    """onnxruntime, batched, no server: the ceiling the served path is measured against."""
    from export.runtime import OrtModel, greedy_translate

    model = OrtModel(cfg.version_dir, cfg.variant, threads=cfg.threads)
    srcs = sources(cfg)

    def decode(batch: list[list[int]]) -> list[list[int]]:
        return greedy_translate(model, batch, cfg.max_new_tokens)

    decode([srcs[0]])
    result.latency_unit = "batch"
    run_batches(result, srcs, length_batches(srcs, cfg.batch_size), decode, cfg.budget_s)


def phase_engine(cfg: PhaseConfig, result: PhaseResult) -> None:
    """The serving engine (service.engine) driven directly: no gRPC, no asyncio, no queue.

    Rows are refilled between steps as soon as they free up, newcomers encoded during the
    step where the engine allows it (what continuous batching does in the server), so this
    is the engine's own offline ceiling for the served path.
    """
    from export.manifest import load_manifest
    from service.domain import DecodingParams, SequenceRequest, Task
    from service.engine import BatchItem, Engine, EngineOptions

    manifest = load_manifest(cfg.version_dir, variants=[cfg.variant])
    options = EngineOptions(
        provider="cpu",
        cpu_variant=cfg.variant,  # type: ignore[arg-type]
        intra_op_threads=cfg.threads,
        max_batch_size=cfg.batch_size,
    )
    engine = Engine(cfg.version_dir, manifest, options)
    engine.warmup()
    params = DecodingParams(max_new_tokens=cfg.max_new_tokens)
    items = [
        BatchItem(i, SequenceRequest(Task.TRANSLATION, text, params), engine.encode(text))
        for i, text in enumerate(cfg.texts)
    ]
    batch = engine.new_batch()
    pending = list(reversed(items))
    started: dict[int, float] = {}
    latencies: list[float] = []
    with ThreadPoolExecutor(1) as helper:
        start = time.perf_counter()
        stopping = False
        while (pending and not stopping) or len(batch):
            if not stopping and time.perf_counter() - start > cfg.budget_s:
                stopping = True  # finish what runs, admit nothing new
                result.notes.append(f"stopped admitting at the {cfg.budget_s:g} s budget")
            joining: list[BatchItem] = []
            while pending and not stopping and batch.free_rows - len(joining) > 0:
                joining.append(pending.pop())
            now = time.perf_counter()
            for item in joining:
                started[int(item.key)] = now  # type: ignore[call-overload]
            _, out, _, refused = batch.step_taking_in(
                joining, helper if engine.overlaps_admission else None
            )
            if refused is not None:
                raise refused
            now = time.perf_counter()
            for key, seq_result in out.finished:
                i = int(key)  # type: ignore[call-overload]
                tokens = list(seq_result.hypotheses[0].token_ids)
                result.outputs[i] = tokens
                result.output_tokens += len(tokens)
                result.requests += 1
                latencies.append(now - started[i])
        result.seconds = time.perf_counter() - start
    result.latency_p50_s = percentile(latencies, 50)
    result.latency_p99_s = percentile(latencies, 99)


def _prepared(cfg: PhaseConfig) -> dict[str, str]:
    path = Path(cfg.work_dir) / "prepared.json"
    return json.loads(path.read_text()) if path.is_file() else {}


RUNNERS: dict[str, Callable[[PhaseConfig, PhaseResult], None]] = {
    "prepare": phase_prepare,
    "pytorch": phase_pytorch,
    "hf": phase_hf,
    "ct2": phase_ct2,
    "ort": phase_ort,
    "engine": phase_engine,
}


def run_phase(name: str, cfg: PhaseConfig) -> PhaseResult:
    result = PhaseResult(name)
    try:
        RUNNERS[name](cfg, result)
    except Skip as skip:
        result.status, result.reason = "skipped", str(skip)
    except Exception as error:
        result.status = "failed"
        result.reason = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    result.peak_rss_bytes = peak_rss()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """python -m loadtest.baselines PHASE CONFIG_JSON OUT_JSON"""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in RUNNERS:
        print(
            f"usage: python -m loadtest.baselines {{{','.join(RUNNERS)}}} CONFIG OUT",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_phase(args[0], PhaseConfig.load(Path(args[1])))
    Path(args[2]).write_text(json.dumps(result.to_json()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

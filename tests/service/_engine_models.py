"""Tiny random models exported to a temporary model repository, once per test process.

A SentencePiece model is trained on tests/fixtures/verses.tsv (English and Spanish), a
random translator (`en-es`) and language model (`en-lm`) are built with an untied, wide
output layer (so outputs vary) and a logit bias on EOS (so some sequences end with EOS
and others run to max_new_tokens), saved as checkpoints and exported with
export.onnx_export.export_checkpoint (fp32 and int8).
"""

from __future__ import annotations

import atexit
import csv
import functools
import io
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from export.onnx_export import export_checkpoint
from export.testing import make_tiny_checkpoint, tiny_config
from tests.fixtures import VERSES as FIXTURE
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.model import Model, build_model

if TYPE_CHECKING:
    import pytest

    from service.engine import Batch, BatchItem, Engine, EngineOptions, StepOutput
    from service.repository import ModelVersion

TRANSLATOR = "en-es"
LM = "en-lm"
EOS_BIAS = {TRANSLATOR: 2.0, LM: 1.5}

SOURCES = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Jesus wept.",
    "And the evening and the morning were the first day.",
    "For God so loved the world.",
    "The LORD is my shepherd; I shall not want.",
]
PROMPTS = [
    "In the beginning",
    "And God said",
    "The",
    "And it came to pass in those days, that there went out a decree",
    "Blessed are",
    "He",
]


def _lines() -> list[str]:
    if FIXTURE.is_file():
        with FIXTURE.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return [row[col] for row in rows for col in ("en", "es") if row.get(col)]
    return SOURCES + PROMPTS


def write_checkpoint(directory: Path, arch: str, eos_bias: float, seed: int = 0) -> Path:
    over = {"positional": "learned"} if arch == "decoder-only" else {}
    make_tiny_checkpoint(
        directory,
        arch,
        seed,
        eos_bias,
        vocab_size=160,
        lines=_lines(),
        sharpen=1.0,
        output_std=0.5,
        max_positions=128,
        tie_output=False,
        final_logits_bias=True,
        **over,
    )
    return directory


def export_version(root: Path, name: str, version: int, seed: int = 0) -> Path:
    """Checkpoint + export of models/<name>/<version>/ under `root` (fp32 and int8)."""
    arch = "encoder-decoder" if name == TRANSLATOR else "decoder-only"
    ckpt = root / name / "checkpoint"
    if not (ckpt / "model.safetensors").is_file() or seed:
        write_checkpoint(ckpt, arch, EOS_BIAS[name], seed)
    out = root / name / str(version)
    export_checkpoint(ckpt, out, variants=["fp32", "int8"], exporter="torchscript")
    return out


@functools.cache
def model_repository() -> Path:
    """A model repository with en-es/1 and en-lm/1 (built once per process)."""
    root = Path(tempfile.mkdtemp(prefix="engine-models-"))
    atexit.register(shutil.rmtree, root, True)
    for name in (TRANSLATOR, LM):
        export_version(root, name, 1)
    return root


@functools.cache
def byte_fallback_lm() -> Path:
    """The version folder of a random language model whose tokenizer has byte pieces
    (built once per process): a character of several bytes comes out a piece at a time."""
    root = Path(tempfile.mkdtemp(prefix="byte-models-"))
    atexit.register(shutil.rmtree, root, True)
    tokenizer = root / "bytes.model"
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()),
        model_writer=buffer,
        vocab_size=400,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )
    tokenizer.write_bytes(buffer.getvalue())
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    config = tiny_config("decoder-only", vocab_size=vocab, positional="learned")
    checkpoint = root / LM / "checkpoint"
    save_checkpoint(build_model(config).eval(), checkpoint, tokenizer=tokenizer)
    out = root / LM / "1"
    export_checkpoint(checkpoint, out, variants=["fp32"], exporter="torchscript")
    return out


@functools.cache
def reference_model(name: str) -> Model:
    """The PyTorch model the export came from (for transformer.decoding)."""
    return load_checkpoint(model_repository() / name / "checkpoint")


def copy_version(root: Path, name: str, src: int, dst: int) -> Path:
    """Copy a version folder under a new number (manifest version rewritten)."""
    import json

    target = root / name / str(dst)
    shutil.copytree(root / name / str(src), target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = dst
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# A prompt the generator continues to max_new_tokens (checked by the scheduler tests).
LONG_PROMPT = "The"


def hooked_engine_factory(
    before_step: Callable[[Batch], object] | None = None,
    timed: bool = False,
    after_step: Callable[[StepOutput], object] | None = None,
    before_prepare: Callable[[Sequence[BatchItem]], object] | None = None,
) -> Callable[[ModelVersion, EngineOptions], Engine]:
    """An engine factory whose batches call `before_step(batch)` before every step (to
    slow the engine down, or to make a step fail) and `after_step(output)` after it,
    before the worker posts it (to hold a step's output back), and whose engine calls
    `before_prepare(items)` before encoding or prefilling newcomers. `timed`: the hooks'
    time counts in the step's reported seconds (as a slow device's step would)."""
    from service.engine import Batch, Engine, Prepared

    class HookedBatch(Batch):
        def step(self) -> StepOutput:
            start = time.perf_counter()
            if before_step is not None:
                before_step(self)
            out = super().step()
            if after_step is not None:
                after_step(out)
            if timed:
                out.seconds = time.perf_counter() - start
            return out

    class HookedEngine(Engine):
        def new_batch(self, compact: bool = True) -> Batch:
            return HookedBatch(self, compact)

        def prepare(self, items: Sequence[BatchItem]) -> Prepared:
            if before_prepare is not None:
                before_prepare(items)
            return super().prepare(items)

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        return HookedEngine(entry.path, entry.manifest, options)

    return factory


def slow_engine_factory(
    delay_s: float, timed: bool = False
) -> Callable[[ModelVersion, EngineOptions], Engine]:
    """Batches sleep `delay_s` per step, so requests stay in flight long enough to cancel,
    expire or queue behind them; `timed`: the sleep counts in the step's reported time."""
    return hooked_engine_factory(lambda _: time.sleep(delay_s), timed)


def slow_decoder(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> list[float]:
    """Every CPU decoder run sleeps `delay_s` first, as a GPU's first run at a shape takes
    long (kernel choice), so a warm-up takes its shapes × delay_s. Returns the list of the
    runs' start times (time.monotonic()), which grows as they run."""
    from service.backends import NumpyBackend

    decode = NumpyBackend.decode
    runs: list[float] = []

    def slow(self: NumpyBackend, *args: Any, **kwargs: Any) -> Any:
        runs.append(time.monotonic())
        time.sleep(delay_s)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(NumpyBackend, "decode", slow)
    return runs

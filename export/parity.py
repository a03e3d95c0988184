"""`python -m export.parity` (make parity): exported variants against PyTorch fp32.

Per model and variant, on the test split (data/pairs.test.tsv; the LM uses data/lm.test.txt
when present, else the English side of the pairs):

* logits: max |ORT - PyTorch| over every step of --logit-verses verses, the ORT side fed
  one token per call through the KV cache (the serving path), PyTorch teacher-forced on
  the same tokens (PyTorch's greedy output). Tolerances in LOGIT_TOLERANCE.
* greedy: export.runtime's numpy loop over the ORT graphs vs transformer.decoding, batched;
  fp32 must be token-identical on every verse.
* BLEU / chrF (sacrebleu) of each variant's greedy translations (translator only); fp16 and
  int8 must stay within BLEU_MARGIN of PyTorch.

Writes a Markdown report (docs/parity.md) with the machine, versions and command, and exits
1 when a check fails. fp16 runs on the CPU when onnxruntime's CPU provider can run it;
otherwise its row says "needs GPU" (see export/gpu_check.py).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from export.manifest import Manifest, ManifestError, load_manifest, version_dirs

# Max-abs logits error allowed vs PyTorch fp32. fp32 differs only by operation order;
# fp16 by half-precision rounding of O(10) logits; int8 weights move logits by O(0.1-1),
# which is why its real gate is BLEU.
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "int8": 2.0}
BLEU_MARGIN = 0.5


@dataclass
class ParityRow:
    model: str
    variant: str
    logits_error: float | None = None
    logit_verses: int = 0
    greedy_identical: int = 0
    greedy_total: int = 0
    bleu: float | None = None
    chrf: float | None = None
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def status(self) -> str:
        if self.note.startswith("needs GPU"):
            return "needs GPU"
        return "FAIL" if self.failures else "ok"


def _chunks(items: list[list[int]], size: int) -> list[list[list[int]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, {platform.platform()}"


def check_model(
    version_dir: Path,
    checkpoint_dir: Path,
    data: Path,
    verses: int,
    logit_verses: int,
    variants: list[str] | None,
    batch_size: int,
    max_new_tokens: int,
    threads: int,
    log: bool = True,
) -> tuple[Manifest, list[ParityRow], dict[str, float]]:
    """Parity rows of every requested variant of one exported version (and PyTorch's BLEU)."""
    import sacrebleu
    import sentencepiece as spm
    import torch

    from export.runtime import (
        OrtModel,
        greedy_generate,
        greedy_translate,
        teacher_forced_logits,
    )
    from transformer.checkpoint import CONFIG, TOKENIZER, WEIGHTS, file_sha256, load_checkpoint
    from transformer.data import load_lines, load_pairs
    from transformer.decoding import DecodingOptions, generate, translate

    def say(message: str) -> None:
        if log:
            typer.echo(message, err=True)

    manifest = load_manifest(version_dir)
    missing = [
        name for name in (CONFIG, WEIGHTS, TOKENIZER) if not (checkpoint_dir / name).is_file()
    ]
    if missing:  # a version exported with --checkpoint from elsewhere: no traceback
        raise typer.BadParameter(
            f"{checkpoint_dir} has no {', '.join(missing)}: parity needs the checkpoint "
            f"{version_dir} was exported from there"
        )
    stale = [
        name
        for name in (CONFIG, WEIGHTS, TOKENIZER)
        if manifest.source.get(name) != file_sha256(Path(checkpoint_dir) / name)
    ]
    if stale:
        raise typer.BadParameter(
            f"{checkpoint_dir} no longer matches {version_dir} ({', '.join(stale)} changed "
            "since the export): re-export"
        )
    model = load_checkpoint(checkpoint_dir)
    if threads:
        torch.set_num_threads(threads)
    sp = spm.SentencePieceProcessor(model_file=str(version_dir / manifest.tokenizer.path))
    cfg = model.config
    translation = manifest.task == "translation"
    new_tokens = min(max_new_tokens, manifest.limits.max_new_tokens)
    references: list[str] = []
    if translation:
        pairs_file = data / "pairs.test.tsv"
        if not pairs_file.is_file():
            raise typer.BadParameter(f"{pairs_file} not found: run `make data` first")
        pairs = load_pairs(pairs_file)[:verses]
        limit = manifest.limits.max_input_tokens
        inputs = [[*sp.encode(p.en), cfg.eos_id][:limit] for p in pairs]
        references = [p.es for p in pairs]
    else:
        lm_file = data / "lm.test.txt"
        pairs_file = data / "pairs.test.tsv"
        if lm_file.is_file():
            texts = load_lines(lm_file)[:verses]
        elif pairs_file.is_file():
            texts = [p.en for p in load_pairs(pairs_file)[:verses]]
        else:
            raise typer.BadParameter(f"{lm_file} not found: run `make data` first")
        # Prompts: BOS + the first 8 tokens; new tokens bounded by the positions left.
        inputs = [[cfg.bos_id, *sp.encode(t)][:9] for t in texts]
        new_tokens = min(new_tokens, cfg.max_positions - 9)
    say(f"{manifest.name}: {len(inputs)} inputs, PyTorch greedy ...")
    options = DecodingOptions(max_new_tokens=new_tokens)
    start = time.perf_counter()
    torch_out: list[list[int]] = []
    for chunk in _chunks(inputs, batch_size):
        hyps = (
            translate(model, chunk, options)  # type: ignore[arg-type]
            if translation
            else generate(model, chunk, options)  # type: ignore[arg-type]
        )
        torch_out += [h[0].tokens for h in hyps]
    torch_seconds = time.perf_counter() - start
    baseline: dict[str, float] = {"seconds": torch_seconds}
    if translation:
        hyps_text = [sp.decode(t) for t in torch_out]
        baseline["bleu"] = sacrebleu.corpus_bleu(hyps_text, [references]).score
        baseline["chrf"] = sacrebleu.corpus_chrf(hyps_text, [references]).score

    # Teacher-forced logits on PyTorch's own greedy outputs.
    n_logits = min(logit_verses, len(inputs))
    if translation:
        sources = inputs[:n_logits]
        targets = [[cfg.decoder_start_id, *t][: cfg.max_positions] for t in torch_out[:n_logits]]
    else:
        sources = None
        targets = [[*p, *t][: cfg.max_positions] for p, t in zip(inputs, torch_out, strict=True)]
        targets = targets[:n_logits]
    reference_logits: list[np.ndarray] = []
    with torch.inference_mode():
        for i, target in enumerate(targets):
            tgt = torch.tensor([target])
            if translation and sources is not None:
                logits = model(torch.tensor([sources[i]]), tgt)  # type: ignore[call-arg]
            else:
                logits = model(tgt)  # type: ignore[call-arg]
            reference_logits.append(logits[0].float().numpy())

    rows = []
    for variant in variants or list(manifest.variants):
        row = ParityRow(manifest.name, variant)
        rows.append(row)
        if variant not in manifest.variants:
            row.note = "not exported"
            row.failures.append("missing variant")
            continue
        try:
            ort_model = OrtModel(version_dir, variant, threads=threads, manifest=manifest)
            probe = [inputs[0]]
            if translation:
                greedy_translate(ort_model, probe, 2)
            else:
                greedy_generate(ort_model, probe, 2)
        except Exception as error:  # any provider failure means "not on this machine"
            if variant == "fp16":
                row.note = f"needs GPU (CPU provider: {str(error).splitlines()[0][:80]})"
                continue
            raise
        say(f"{manifest.name}/{variant}: logits on {n_logits}, greedy on {len(inputs)} ...")
        got = teacher_forced_logits(ort_model, sources, targets)
        row.logit_verses = len(got)
        errors = [
            float(np.abs(g.astype(np.float32) - r).max())
            for g, r in zip(got, reference_logits, strict=True)
        ]
        row.logits_error = max(errors, default=0.0)
        if row.logits_error > LOGIT_TOLERANCE[variant]:
            row.failures.append(
                f"logits error {row.logits_error:.2e} > {LOGIT_TOLERANCE[variant]:.0e}"
            )
        start = time.perf_counter()
        ort_out: list[list[int]] = []
        for chunk in _chunks(inputs, batch_size):
            if translation:
                ort_out += greedy_translate(ort_model, chunk, new_tokens)
            else:
                ort_out += greedy_generate(ort_model, chunk, new_tokens)
        row.seconds = time.perf_counter() - start
        row.greedy_total = len(inputs)
        row.greedy_identical = sum(a == b for a, b in zip(ort_out, torch_out, strict=True))
        if variant == "fp32" and row.greedy_identical != row.greedy_total:
            row.failures.append(f"greedy differs on {row.greedy_total - row.greedy_identical}")
        if translation:
            text = [sp.decode(t) for t in ort_out]
            row.bleu = sacrebleu.corpus_bleu(text, [references]).score
            row.chrf = sacrebleu.corpus_chrf(text, [references]).score
            if variant != "fp32" and baseline["bleu"] - row.bleu > BLEU_MARGIN:
                row.failures.append(
                    f"BLEU {row.bleu:.2f} more than {BLEU_MARGIN} below PyTorch "
                    f"{baseline['bleu']:.2f}"
                )
    return manifest, rows, baseline


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_report(
    results: list[tuple[Manifest, list[ParityRow], dict[str, float]]], command: str
) -> str:
    """Markdown: how it was run, then one table row per model and variant."""
    import onnxruntime
    import sacrebleu
    import torch

    providers = ", ".join(onnxruntime.get_available_providers())
    lines = [
        "# ONNX export parity",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.",
        "",
        f"- Machine: {_machine()}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__} ({providers}), sacrebleu {sacrebleu.__version__}",
        "- Logits: max |ORT - PyTorch fp32| over every step of N verses, ORT fed one token "
        "per call through the KV cache. Tolerance: "
        + ", ".join(f"{k} {v:g}" for k, v in LOGIT_TOLERANCE.items())
        + ".",
        "- Greedy: token-identical outputs vs transformer.decoding (required for fp32). "
        f"BLEU/chrF: sacrebleu on the test split; fp16/int8 within {BLEU_MARGIN} BLEU of "
        "PyTorch.",
        "",
        "| model | version | variant | logits max-abs (N) | tolerance | greedy identical | "
        "BLEU | chrF | ΔBLEU | decode s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for manifest, rows, base in results:
        lines.append(
            f"| {manifest.name} | {manifest.version} | PyTorch fp32 | — | — | — | "
            f"{_fmt(base.get('bleu'))} | {_fmt(base.get('chrf'))} | — | "
            f"{base['seconds']:.1f} | reference |"
        )
        for row in rows:
            delta = None if row.bleu is None or "bleu" not in base else row.bleu - base["bleu"]
            logits = (
                "—" if row.logits_error is None else f"{row.logits_error:.2e} ({row.logit_verses})"
            )
            greedy = f"{row.greedy_identical}/{row.greedy_total}" if row.greedy_total else "—"
            status = row.status if not row.failures else "FAIL: " + "; ".join(row.failures)
            if row.note:
                status = f"{status} ({row.note})" if not row.note.startswith("needs") else row.note
            lines.append(
                f"| {row.model} | {manifest.version} | {row.variant} | {logits} | "
                f"{LOGIT_TOLERANCE[row.variant]:g} | {greedy} | {_fmt(row.bleu)} | "
                f"{_fmt(row.chrf)} | {_fmt(delta)} | {row.seconds:.1f} | {status} |"
            )
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    repository: Annotated[Path, typer.Option(help="Model repository.")] = Path("models"),
    name: Annotated[
        list[str] | None, typer.Option("--name", help="Model(s) to check (default: all).")
    ] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: the highest).")] = None,
    data: Annotated[Path, typer.Option(help="Output folder of `make data`.")] = Path("data"),
    verses: Annotated[int, typer.Option(min=1, help="Test verses for greedy and BLEU.")] = 200,
    logit_verses: Annotated[int, typer.Option(min=1, help="Verses for logits error.")] = 32,
    variants: Annotated[
        str | None, typer.Option(help="Comma list (default: all exported).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    threads: Annotated[int, typer.Option(help="Threads for torch and onnxruntime (0: all).")] = 0,
    out: Annotated[Path, typer.Option(help="Markdown report.")] = Path("docs/parity.md"),
) -> None:
    """Check every exported variant against the PyTorch checkpoint; write the report."""
    names = name or sorted(
        p.parent.name for p in repository.glob("*/checkpoint") if version_dirs(p.parent)
    )
    if not names:
        typer.echo(f"no exported models under {repository}: run `make export` first", err=True)
        raise typer.Exit(1)
    chosen = [v.strip() for v in variants.split(",")] if variants else None
    unknown = [v for v in chosen or [] if v not in LOGIT_TOLERANCE]
    if unknown:  # refused now, not by a KeyError in the report after the whole run
        raise typer.BadParameter(
            f"--variants: {unknown} unknown; choose from {', '.join(LOGIT_TOLERANCE)}"
        )
    results = []
    for model_name in names:
        versions = version_dirs(repository / model_name)
        if not versions:
            raise typer.BadParameter(f"{repository / model_name} has no exported version")
        number = version if version is not None else versions[-1]
        try:
            results.append(
                check_model(
                    repository / model_name / str(number),
                    repository / model_name / "checkpoint",
                    data,
                    verses,
                    logit_verses,
                    chosen,
                    batch_size,
                    max_new_tokens,
                    threads,
                )
            )
        except ManifestError as error:  # no such version, or one damaged: not a traceback
            raise typer.BadParameter(
                f"{error}; the versions of {model_name} are {versions}: pick one with "
                "--version, or re-export it (`make export`)"
            ) from error
    command = "python -m export.parity " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = render_report(results, command.strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    typer.echo(report)
    if any(row.failures for _, rows, _ in results for row in rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

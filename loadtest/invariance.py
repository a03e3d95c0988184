"""`python -m loadtest.invariance`: does an answer depend on what shares its batch?

Decodes texts with the serving engine (greedy) each alone and then all in one batch, and
compares: how many answers differ, and the largest change of a row's logits between its
batch and alone (teacher-forced on the batched answer, so both see the same tokens).
On the CPU, fp32 moves logits by float rounding only (padding changes summation
lengths); dynamic int8 quantizes activations over the whole batch, which moves them much
more. The figures behind the CPU's default variant (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from loadtest import provenance

ROOT = Path(__file__).resolve().parents[1]
VERSES = ROOT / "tests" / "fixtures" / "verses.tsv"

app = typer.Typer(add_completion=False)


def texts_for(task: str, count: int, path: Path = VERSES) -> list[str]:
    """English verses to translate, or their first four words as prompts to continue."""
    with path.open(newline="") as f:
        rows = [row["en"] for row in csv.DictReader(f, delimiter="\t")][:count]
    return rows if task == "translation" else [" ".join(r.split()[:4]) for r in rows]


def compare(
    version_dir: Path, variant: str, count: int, max_new_tokens: int, threads: int
) -> dict[str, Any]:
    """Greedy answers alone vs batched, and the largest logits change, for one variant."""
    from export.manifest import load_manifest
    from export.runtime import OrtModel, teacher_forced_logits
    from service.domain import DecodingParams, SequenceRequest, Task
    from service.engine import Engine, EngineOptions, decode_all

    manifest = load_manifest(version_dir, variants=[variant])
    options = EngineOptions(
        provider="cpu",
        cpu_variant=variant,  # type: ignore[arg-type]
        intra_op_threads=threads,
        max_batch_size=max(count, 1),
        warmup=False,
    )
    engine = Engine(version_dir, manifest, options)
    task = Task(manifest.task)
    params = DecodingParams(max_new_tokens=max_new_tokens)
    requests = [SequenceRequest(task, text, params) for text in texts_for(manifest.task, count)]
    together = [r.hypotheses[0].token_ids for r in decode_all(engine, requests)]
    alone = [decode_all(engine, [r])[0].hypotheses[0].token_ids for r in requests]
    model = OrtModel(version_dir, variant, threads=threads, manifest=manifest)
    ids = manifest.special_ids
    if task is Task.TRANSLATION:
        sources: list[list[int]] | None = [engine.encode(r.text) for r in requests]
        targets = [[ids.decoder_start_id, *t] for t in together]
    else:
        sources = None
        targets = [[*engine.encode(r.text), *t] for r, t in zip(requests, together, strict=True)]
    batched = teacher_forced_logits(model, sources, targets)
    largest = 0.0
    for i, target in enumerate(targets):
        one = teacher_forced_logits(model, [sources[i]] if sources else None, [target])[0]
        largest = max(largest, float(np.abs(one - batched[i]).max()))
    return {
        "variant": variant,
        "texts": len(requests),
        "answers_that_differ": sum(a != b for a, b in zip(alone, together, strict=True)),
        "max_logit_change": largest,
    }


@app.command()
def main(
    version_dir: Annotated[Path, typer.Option(help="A model version folder.")] = Path(
        "models/en-es/1"
    ),
    variants: Annotated[str, typer.Option(help="Comma list of CPU variants.")] = "fp32,int8",
    texts: Annotated[int, typer.Option(min=1, max=400, help="Test verses to decode.")] = 48,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512)] = 48,
    threads: Annotated[int, typer.Option(min=1, max=256)] = 2,
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON.")] = None,
) -> None:
    """Answers alone vs batched: how many differ, and the largest logits change."""
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    bad = [v for v in chosen if v not in ("fp32", "int8")]
    if bad or not chosen:
        raise typer.BadParameter(f"--variants must be a comma list of fp32, int8; got {variants!r}")
    if not (version_dir / "manifest.json").is_file():
        raise typer.BadParameter(f"{version_dir} has no manifest.json (run `make export`)")
    rows = [compare(version_dir, v, texts, max_new_tokens, threads) for v in chosen]
    result = {
        "command": shlex.join(["python", "-m", "loadtest.invariance", *sys.argv[1:]]),
        "version_dir": str(version_dir),
        "max_new_tokens": max_new_tokens,
        "machine": provenance.machine(),
        "versions": provenance.versions(),
        "git_commit": provenance.git_commit(),
        "rows": rows,
    }
    for row in rows:
        typer.echo(
            f"{version_dir} {row['variant']}: {row['answers_that_differ']} of {row['texts']} "
            f"answers differ alone vs batched; largest logits change {row['max_logit_change']:.2g}"
        )
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app()

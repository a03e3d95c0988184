"""`python -m export`: export models/<name>/checkpoint/ to models/<name>/<version>/.

With no options every checkpoint in the repository is exported (skipped when its version
folder is already up to date: same checkpoint, name, languages, variants, options and
EXPORT_VERSION). A version folder that holds another model is not rewritten without
--replace: publish a new version number instead.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from export.manifest import MAX_VERSION

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=False)


def _variants(value: str) -> list[str]:
    from export.manifest import VARIANTS

    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad or not chosen:
        raise typer.BadParameter(f"variants must be a comma list of {VARIANTS}, got {value!r}")
    return chosen


@contextlib.contextmanager
def _unwinding_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (the half-built version folder is removed on the way
    out), while the export runs."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def main(
    repository: Annotated[
        Path, typer.Option(help="Model repository: <repository>/<name>/checkpoint/.")
    ] = Path("models"),
    name: Annotated[
        list[str] | None, typer.Option("--name", help="Model(s) to export (default: all).")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Export this checkpoint folder instead (as --name, default its parent)."),
    ] = None,
    version: Annotated[
        int, typer.Option(min=1, max=MAX_VERSION, help="Version folder to write.")
    ] = 1,
    variants: Annotated[str, typer.Option(help="Comma list of fp32, fp16, int8.")] = (
        "fp32,fp16,int8"
    ),
    force: Annotated[bool, typer.Option(help="Rebuild even when up to date.")] = False,
    replace: Annotated[
        bool,
        typer.Option(help="Rewrite a version folder that holds another model (new weights)."),
    ] = False,
    exporter: Annotated[
        str, typer.Option(help="torch.onnx path: dynamo (default) or torchscript (faster).")
    ] = "dynamo",
    source_language: Annotated[
        str | None, typer.Option(help="Override the source language.")
    ] = None,
    target_language: Annotated[
        str | None, typer.Option(help="Override the target language.")
    ] = None,
    optimize: Annotated[bool, typer.Option(help="Offline onnxruntime optimizations.")] = True,
) -> None:
    """Export checkpoints to versioned ONNX model folders with a manifest."""
    chosen = _variants(variants)
    if exporter not in ("dynamo", "torchscript"):
        raise typer.BadParameter(f"--exporter must be dynamo or torchscript, got {exporter!r}")
    logging.getLogger().setLevel(logging.ERROR)  # quantization's advice to pre-process
    from export.onnx_export import ExportError, export_model, find_checkpoints
    from transformer.checkpoint import CheckpointError
    from transformer.config import ConfigError

    with _unwinding_on_sigterm():
        if checkpoint is not None:
            if name and len(name) > 1:
                raise typer.BadParameter("--checkpoint exports one model: give at most one --name")
            if not checkpoint.is_dir():
                raise typer.BadParameter(f"--checkpoint {checkpoint} is not a folder")
            model_name = name[0] if name else checkpoint.resolve().parent.name
            targets = {model_name: checkpoint}
        else:
            try:
                targets = find_checkpoints(repository, name or [])
            except ExportError as error:
                raise typer.BadParameter(str(error)) from error
            if not targets:
                typer.echo(
                    f"no checkpoints under {repository}/<name>/checkpoint/: nothing to export",
                    err=True,
                )
                raise typer.Exit(1)
        for model_name, ckpt in targets.items():
            out = repository / model_name / str(version)
            start = time.perf_counter()
            try:
                manifest, rebuilt = export_model(
                    ckpt,
                    out,
                    chosen,
                    force=force,
                    replace=replace,
                    name=model_name,
                    version=version,
                    source_language=source_language,
                    target_language=target_language,
                    exporter=exporter,  # type: ignore[arg-type]
                    optimize=optimize,
                )
            except (ExportError, ConfigError, CheckpointError) as error:
                typer.echo(f"{model_name}: {error}", err=True)
                raise typer.Exit(1) from error
            except OSError as error:  # a folder that cannot be written, a path that is a file
                typer.echo(f"{model_name}: cannot export to {out}: {error}", err=True)
                raise typer.Exit(1) from error
            what = "exported" if rebuilt else "up to date"
            typer.echo(
                f"{out}: {what} ({manifest.task}, {manifest.source_language}->"
                f"{manifest.target_language}, variants {','.join(manifest.variants)}, "
                f"{time.perf_counter() - start:.1f} s)"
            )


if __name__ == "__main__":
    app()

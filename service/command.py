"""The `python -m service` command: start the inference server (see `--help` for every
setting).

Every field of `service.settings.Settings` is a flag (`--max-queue 256`); flags override
environment variables (SERVE_MAX_QUEUE=256), which override the YAML file given with
`--config` (or SERVE_CONFIG), which overrides the defaults. A SERVE_ variable that names no
setting is refused: misspelt, it would leave the default in force without a word.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from service import logging as json_logging
from service.gpu import align_device_order
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

HELP = (
    "Serve the exported models over gRPC (health, reflection; Prometheus /metrics). "
    f"Flags override env ({ENV_PREFIX}<FIELD>), which overrides --config YAML, then defaults."
)
# Paths stay strings on the command line: typer makes "" the folder ".", where the settings
# read an empty path (a template's `--tls-cert "$CERT"`) as unset.
_TYPES: dict[Any, type] = {int: int, float: float, str: str}


def _flag_type(annotation: Any) -> type:
    """The CLI type of a settings field: Literal, SecretStr and Path become str; Optional
    unwrapped."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    if args and typing.get_origin(annotation) is not typing.Literal:
        return _flag_type(args[0])
    return _TYPES.get(annotation, str)


def _parameters() -> list[inspect.Parameter]:
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(help=f"YAML file of settings ({ENV_PREFIX}CONFIG)."),
            ],
        )
    ]
    for name, info in Settings.model_fields.items():
        choices = typing.get_args(info.annotation)
        hint = (
            f" One of: {', '.join(map(str, choices))}."
            if typing.get_origin(info.annotation) is typing.Literal
            else ""
        )
        is_bool = info.annotation is bool  # a string flag: `--cuda-graphs false` reads false
        default = "unset" if info.default is None else info.default
        if is_bool:
            default = str(default).lower()
        help_text = f"{info.description}{hint} (env {ENV_PREFIX}{name.upper()}, default {default})"
        is_path = Path in (info.annotation, *typing.get_args(info.annotation))
        metavar = "<path>" if is_path else "true|false" if is_bool else None
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    _flag_type(info.annotation) | None,  # type: ignore[operator]
                    typer.Option(help=help_text, show_default=False, metavar=metavar),
                ],
            )
        )
    return params


def run(**flags: Any) -> None:
    """Serve the exported models over gRPC (health, reflection, metrics on /metrics)."""
    config = flags.pop("config", None)
    try:
        settings = load_settings(config, **flags)
    except SettingsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    json_logging.configure(settings.log_level)
    align_device_order()
    from service.server import serve  # after logging: imports onnxruntime

    raise typer.Exit(asyncio.run(serve(settings)))


run.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=HELP)(run)
    app(args=argv if argv is not None else sys.argv[1:], prog_name="python -m service")

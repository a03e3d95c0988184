"""A damaged config.json or weights file is a ConfigError / CheckpointError naming what is
wrong, which the command lines print as one line, never a bare TypeError or RuntimeError."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from export.testing import tiny_config
from transformer.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from transformer.config import ConfigError, TransformerConfig
from transformer.model import build_model


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", ["not valid JSON"]),
        ("[1, 2]", ["JSON object", "list"]),
        (json.dumps({"dropout": "none"}), ["dropout", "wrong type"]),
        (json.dumps({"pad_id": "0"}), ["pad_id", "wrong type"]),
        (json.dumps({"vocab_size": 96.0}), ["vocab_size", "wrong type"]),
        (json.dumps({"norm_first": 1}), ["norm_first", "wrong type"]),
        (json.dumps({"activation": 3}), ["activation", "wrong type"]),
    ],
)
def test_a_bad_config_json_is_a_config_error(text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        TransformerConfig.from_json(text)
    for word in words:
        assert word in str(info.value)


def test_json_numbers_fit_float_fields() -> None:
    data: dict[str, Any] = {"dropout": 0, "layer_norm_eps": 1}
    assert TransformerConfig.from_dict(data).dropout == 0


def test_a_config_file_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG).write_text("{")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / CONFIG))):
        TransformerConfig.load(tmp_path / CONFIG)


def test_weights_of_another_shape_are_a_checkpoint_error(tmp_path: Path) -> None:
    save_checkpoint(build_model(tiny_config()), tmp_path)
    tiny_config(d_ff=128).save(tmp_path / CONFIG)
    with pytest.raises(CheckpointError, match=r"do not match config\.json: size mismatch"):
        load_checkpoint(tmp_path)


def test_an_unreadable_weights_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    save_checkpoint(build_model(tiny_config()), tmp_path)
    (tmp_path / WEIGHTS).write_bytes((tmp_path / WEIGHTS).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read .*{re.escape(WEIGHTS)}"):
        load_checkpoint(tmp_path)

"""Model cards say how the model was trained from its own training record."""

from __future__ import annotations

import json
from pathlib import Path

from transformer.evaluate import _trained


def test_the_training_line_comes_from_training_json(tmp_path: Path) -> None:
    (tmp_path / "training.json").write_text(
        json.dumps({"wall_time_s": 4500.8, "hardware": "x86_64, 2 threads"})
    )
    assert _trained(tmp_path) == "Small model, trained for 75 min (x86_64, 2 threads)."


def test_without_a_training_record_the_card_says_so(tmp_path: Path) -> None:
    assert "training.json) is missing" in _trained(tmp_path)

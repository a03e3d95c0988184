"""The streamed-message cost probe counts what its server sent and refuses bad sizes."""

from __future__ import annotations

from typer.testing import CliRunner

from loadtest.stream_cost import app, measure


def test_every_message_of_every_call_is_counted() -> None:
    runs = measure(tokens=8, per_message=3, streams=2, calls=2, repeats=2)
    assert len(runs) == 2
    for run in runs:
        # 8 tokens, 3 per message: 3 messages, then the one that says finished; 4 calls.
        assert run["messages"] == 4 * (3 + 1)
        assert run["server_cpu_s"] >= 0 and run["seconds"] > 0


def test_bad_sizes_are_refused_naming_the_option() -> None:
    for bad in ("0", "a,b", ""):
        result = CliRunner().invoke(app, ["--per-message", bad])
        assert result.exit_code != 0
        assert "--per-message" in result.output

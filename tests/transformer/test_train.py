"""The training loop on the committed verse fixture: loss falls, checkpoints resume."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import typer
from typer.testing import CliRunner, Result

from tests.fixtures import VERSES as FIXTURE
from transformer.checkpoint import load_checkpoint
from transformer.data import load_pairs, train_sentencepiece
from transformer.train import (
    TRANSLATOR,
    Example,
    TrainSettings,
    app,
    learning_rate,
    make_batches,
    run_training,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pairs = load_pairs(FIXTURE)
    prefix = tmp_path_factory.mktemp("spm") / "fixture"
    return train_sentencepiece([t for p in pairs for t in (p.en, p.es)], prefix, 300)


@pytest.fixture(scope="module")
def examples(tokenizer: Path) -> list[Example]:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    pairs = load_pairs(FIXTURE)[:96]
    return [Example([*sp.encode(p.en), TRANSLATOR.eos_id], sp.encode(p.es)) for p in pairs]


TINY = replace(
    TRANSLATOR,
    vocab_size=300,
    d_model=32,
    n_heads=2,
    n_encoder_layers=1,
    n_decoder_layers=1,
    d_ff=64,
    dropout=0.0,
)


def settings(max_steps: int, eval_every: int = 10) -> TrainSettings:
    return TrainSettings(
        max_tokens=1500,
        lr=3e-3,
        warmup=5,
        label_smoothing=0.1,
        clip=1.0,
        max_steps=max_steps,
        max_minutes=5.0,
        eval_every=eval_every,
        seed=0,
        device="cpu",
        amp=False,
    )


def test_loss_falls_and_the_checkpoint_is_written(
    tmp_path: Path, examples: list[Example], tokenizer: Path
) -> None:
    torch.set_num_threads(1)
    record = run_training(
        "translator", TINY, examples, examples[:32], settings(160, eval_every=40),
        tmp_path / "out", tmp_path / "work", tokenizer, resume=False,
    )  # fmt: skip
    losses = [h["dev_loss"] for h in record["history"]]
    assert len(losses) == 4
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.25, losses
    assert record["steps"] == 160
    saved = json.loads((tmp_path / "out" / "training.json").read_text())
    assert saved["best_dev_loss"] == min(losses)
    model = load_checkpoint(tmp_path / "out")
    assert model.config == TINY
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


def test_resume_continues_from_the_saved_step(
    tmp_path: Path, examples: list[Example], tokenizer: Path
) -> None:
    torch.set_num_threads(1)
    args = ("translator", TINY, examples, examples[:32])
    first = run_training(*args, settings(20), tmp_path / "out", tmp_path / "work", tokenizer, True)
    assert first["steps"] == 20
    second = run_training(*args, settings(30), tmp_path / "out", tmp_path / "work", tokenizer, True)
    assert second["steps"] == 30
    # The history carries on from the first run instead of starting again.
    assert [h["step"] for h in second["history"]] == [10, 20, 30]
    assert second["history"][:2] == first["history"]
    # A run resumed at its limit trains nothing more, and keeps what it had.
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()
    third = run_training(*args, settings(30), tmp_path / "out", tmp_path / "work", tokenizer, True)
    assert third["steps"] == 30 and third["history"] == second["history"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights


def test_batches_hold_every_example_once_within_the_token_budget(
    examples: list[Example],
) -> None:
    batches = make_batches(examples, 800, random.Random(0))
    seen = [id(e) for batch in batches for e in batch]
    assert sorted(seen) == sorted(id(e) for e in examples)
    for batch in batches:
        longest = max(max(len(e.source), len(e.target)) for e in batch)
        assert len(batch) == 1 or 2 * longest * len(batch) <= 800


def test_learning_rate_warms_up_then_decays() -> None:
    rates = [learning_rate(step, 1e-3, 100) for step in (1, 50, 100, 400)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert rates[3] == pytest.approx(5e-4)


def test_missing_data_names_the_command_to_run(tmp_path: Path) -> None:

    result = CliRunner().invoke(app, ["translator", "--data", str(tmp_path)])
    assert result.exit_code != 0
    assert "make data" in result.output


def _train_lm(tmp_path: Path, tokenizer: Path, name: str, *options: str) -> Result:
    """`train lm` for one step on fixture verses, into tmp_path / name."""
    data = tmp_path / "data"
    if not data.is_dir():
        (data / "spm").mkdir(parents=True)
        (data / "spm" / "lm.model").write_bytes(tokenizer.read_bytes())
        lines = [p.en for p in load_pairs(FIXTURE)[:24]]
        (data / "lm.train.txt").write_text("\n".join(lines[:16]) + "\n")
        (data / "lm.dev.txt").write_text("\n".join(lines[16:]) + "\n")
    args = ["lm", "--data", str(data), "--out", str(tmp_path / name)]
    args += ["--work-dir", str(tmp_path / f"{name}-work"), "--max-steps", "1", "--no-amp"]
    return CliRunner().invoke(app, [*args, "--threads", "1", *options])


def _train_translator(tmp_path: Path, tokenizer: Path, name: str, *options: str) -> Result:
    """`train translator` (the shipped model's shape) for one step on fixture pairs."""
    data = tmp_path / "data"
    if not data.is_dir():
        (data / "spm").mkdir(parents=True)
        (data / "spm" / "translator.model").write_bytes(tokenizer.read_bytes())
        header, *lines = FIXTURE.read_text().splitlines(keepends=True)
        (data / "pairs.train.tsv").write_text("".join([header, *lines[:16]]))
        (data / "pairs.dev.tsv").write_text("".join([header, *lines[16:20]]))
    args = ["translator", "--data", str(data), "--out", str(tmp_path / name)]
    args += ["--work-dir", str(tmp_path / f"{name}-work"), "--max-steps", "1", "--no-amp"]
    args += ["--dev-bleu-verses", "2", "--max-len", "400"]
    return CliRunner().invoke(app, [*args, "--threads", "1", *options])


def _said(result: Result) -> str:
    """A CLI error's words on one line: rich wraps them in a box as wide as the terminal."""
    return " ".join(result.output.replace("│", " ").split())


def test_lm_positions_are_all_trained(tmp_path: Path, tokenizer: Path) -> None:
    """A learned position table longer than the training blocks keeps untrained rows that
    generation then uses (the shipped LM, 128-token blocks and 512 positions, doubles its
    perplexity past position 128): the LM's max_positions is its block length."""
    result = _train_lm(tmp_path, tokenizer, "out", "--block", "16")
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "out")
    assert model.config.positional == "learned"
    # Inputs of a block are its first 16 tokens: positions 0 .. 15, every row of the table.
    assert model.config.max_positions == 16


def test_an_lm_trained_on_short_blocks_goes_on_with_longer_ones(
    tmp_path: Path, tokenizer: Path
) -> None:
    """--init-from grows a checkpoint's learned positions to --block, keeping every weight
    it had (its trained rows too), so training goes on where it was instead of anew; a
    table it would have to shrink, or a model of another vocabulary, is refused by name."""
    from transformer.train import _grown

    assert _train_lm(tmp_path, tokenizer, "short", "--block", "16").exit_code == 0
    base = load_checkpoint(tmp_path / "short")
    config = replace(base.config, max_positions=48)
    grown = _grown(tmp_path / "short", config)
    assert grown.config == config
    kept, new = base.state_dict(), grown.state_dict()
    for name, tensor in kept.items():
        if name.endswith("position.weight"):
            assert new[name].shape == (48, base.config.d_model)
            assert torch.equal(new[name][:16], tensor)
            assert new[name][16:].std() > 0  # initialised, not zeros
        else:
            assert torch.equal(new[name], tensor), name
    result = _train_lm(
        tmp_path, tokenizer, "long", "--block", "48", "--init-from", f"{tmp_path / 'short'}"
    )
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "long").config.max_positions == 48
    record = json.loads((tmp_path / "long" / "training.json").read_text())
    assert record["init_from"] == str(tmp_path / "short")
    assert record["settings"]["block"] == 48
    assert record["init_training"] == json.loads((tmp_path / "short" / "training.json").read_text())
    shrink = _train_lm(
        tmp_path, tokenizer, "x", "--block", "8", "--init-from", f"{tmp_path / 'short'}"
    )
    assert shrink.exit_code != 0 and "can only grow to --block 8, not shrink" in _said(shrink)
    missing = _train_lm(tmp_path, tokenizer, "y", "--init-from", f"{tmp_path / 'nowhere'}")
    assert missing.exit_code != 0 and "--init-from" in _said(missing)
    assert "has no config.json" in _said(missing)
    with pytest.raises(typer.BadParameter, match="this run trains a decoder-only model of 999"):
        _grown(tmp_path / "short", replace(config, vocab_size=999))


def test_a_translator_goes_on_from_its_checkpoint(tmp_path: Path, tokenizer: Path) -> None:
    """--init-from starts the translator from a checkpoint's weights (the shipped one
    stopped at its time limit with dev loss still falling), not from a new model, and
    records the run it began with; an LM checkpoint is refused by name."""
    first = _train_translator(tmp_path, tokenizer, "first")
    assert first.exit_code == 0, first.output
    # Another seed makes another new model; at a negligible learning rate a run from
    # "first" keeps its weights instead.
    args = ("--seed", "2", "--lr", "1e-12")
    fresh = _train_translator(tmp_path, tokenizer, "fresh", *args)
    on = _train_translator(tmp_path, tokenizer, "on", *args, "--init-from", str(tmp_path / "first"))
    assert fresh.exit_code == 0 and on.exit_code == 0, fresh.output + on.output
    base = load_checkpoint(tmp_path / "first").state_dict()
    went_on = load_checkpoint(tmp_path / "on").state_dict()
    anew = load_checkpoint(tmp_path / "fresh").state_dict()
    assert all(torch.equal(went_on[name], tensor) for name, tensor in base.items())
    assert not all(torch.equal(anew[name], tensor) for name, tensor in base.items())
    record = json.loads((tmp_path / "on" / "training.json").read_text())
    assert record["init_from"] == str(tmp_path / "first")
    assert record["init_training"] == json.loads((tmp_path / "first" / "training.json").read_text())
    assert _train_lm(tmp_path / "lm", tokenizer, "out").exit_code == 0
    lm = str(tmp_path / "lm" / "out")
    wrong = _train_translator(tmp_path, tokenizer, "x", "--init-from", lm)
    assert wrong.exit_code != 0 and "--init-from" in _said(wrong)
    assert "is a decoder-only model" in _said(wrong)
    short = _train_translator(tmp_path, tokenizer, "y", "--max-len", "4")
    assert short.exit_code != 0 and "no train pair is under 4 tokens" in _said(short)


@pytest.mark.parametrize(
    ("kind", "option", "value"),
    [
        ("lm", "--warmup", "0"),
        ("lm", "--eval-every", "0"),
        ("lm", "--block", "0"),
        ("lm", "--lr", "-1"),
        ("lm", "--clip", "-1"),
        ("lm", "--label-smoothing", "1.5"),
        ("lm", "--threads", "-2"),
        ("translator", "--warmup", "0"),
        ("translator", "--max-steps", "0"),
        ("translator", "--lr", "0"),
    ],
)
def test_an_option_out_of_range_is_refused_by_name_before_training(
    tmp_path: Path, tokenizer: Path, kind: str, option: str, value: str
) -> None:
    """--warmup 0 and --eval-every 0 were a ZeroDivisionError (the second after the first
    step), --block 0 a ConfigError, --lr -1 AdamW's ValueError, all as tracebacks; --clip
    -1 trained uphill without a word."""
    train = _train_lm if kind == "lm" else _train_translator
    result = train(tmp_path, tokenizer, "out", option, value)
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, (ZeroDivisionError, ValueError, RuntimeError))
    assert option in _said(result)
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_of_another_block_length_is_refused_by_name(
    tmp_path: Path, tokenizer: Path
) -> None:
    """Resuming takes the model saved in --work-dir: with another --block its inputs
    outran its learned positions, an IndexError traceback once the data had loaded."""
    assert _train_lm(tmp_path, tokenizer, "run", "--block", "16").exit_code == 0
    again = _train_lm(tmp_path, tokenizer, "run", "--block", "48", "--max-steps", "3")
    assert again.exit_code == 2, again.output
    assert not isinstance(again.exception, IndexError)
    assert "--work-dir" in _said(again) and "max_positions 16 -> 48" in _said(again)
    assert load_checkpoint(tmp_path / "run").config.max_positions == 16
    fresh = _train_lm(tmp_path, tokenizer, "run", "--block", "48", "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert load_checkpoint(tmp_path / "run").config.max_positions == 48

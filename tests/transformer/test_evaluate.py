"""Model cards say how the model was trained from its own training record."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from export.testing import make_tiny_checkpoint
from tests.fixtures import VERSES
from transformer.data import Pair, load_pairs, write_lines, write_pairs
from transformer.evaluate import (
    _card_header,
    _context_limit,
    _trained,
    app,
    identical_in_training,
    perplexity_by_position,
    seen_in_training,
    similarity,
    words,
)


def test_the_training_line_comes_from_training_json(tmp_path: Path) -> None:
    (tmp_path / "training.json").write_text(
        json.dumps({"wall_time_s": 4500.8, "hardware": "x86_64, 2 threads"})
    )
    assert _trained(tmp_path) == "Small model, trained for 75 min (x86_64, 2 threads)."


def test_a_model_trained_on_from_another_says_how_each_run_went(tmp_path: Path) -> None:
    """`train --init-from` keeps the record of the run it started from: the card names
    every run, first to last, and the time they took together."""
    first = {
        "steps": 1560, "wall_time_s": 3600.0, "hardware": "x86_64, 1 threads",
        "settings": {"lr": 0.001, "warmup": 500, "max_tokens": 8192},
    }  # fmt: skip
    last = {
        "steps": 400, "wall_time_s": 1200.0, "hardware": "x86_64, 2 threads",
        "best_step": 400, "epochs_completed": 3, "device": "cpu", "init_training": first,
        "settings": {"lr": 0.0003, "warmup": 100, "max_tokens": 8192, "block": 512},
    }  # fmt: skip
    (tmp_path / "training.json").write_text(json.dumps(last))
    config = {"arch": "decoder-only", "d_model": 8, "n_heads": 2, "n_encoder_layers": 0,
              "n_decoder_layers": 1, "d_ff": 16, "norm_first": True, "positional": "learned",
              "activation": "gelu", "vocab_size": 10}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _trained(tmp_path) == (
        "Small model, trained for 80 min in 2 runs (x86_64, 1 threads; x86_64, 2 threads)."
    )
    card = "\n".join(_card_header("m", tmp_path, torch.nn.Linear(2, 2)))
    assert (
        "| training | run 1: 1560 steps (lr 0.001, warm-up 500, ≤ 8192 tokens a batch, "
        "60.0 min on x86_64, 1 threads); run 2, from run 1's weights: 400 steps on 512-token "
        "blocks (lr 0.0003, warm-up 100, ≤ 8192 tokens a batch, 20.0 min on x86_64, 2 "
        "threads) |" in card
    )
    assert "| last run | best dev loss at step 400, epochs completed 3 (cpu) |" in card
    assert "| wall time | 80.0 min in all |" in card
    assert "| training steps |" not in card


def test_without_a_training_record_the_card_says_so(tmp_path: Path) -> None:
    assert "training.json) is missing" in _trained(tmp_path)


class _Counting:
    """Predicts "the next token is this one + 1" with logit 5 at positions below `known`,
    and nothing (uniform) from there on: a position the training never reached."""

    def __init__(self, vocab: int, max_positions: int, known: int) -> None:
        self.vocab, self.known = vocab, known
        self.config = SimpleNamespace(max_positions=max_positions)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)  # [B, T, V]
        nxt = ((ids + 1) % self.vocab)[:, : self.known, None]  # [B, known, 1]
        logits[:, : self.known].scatter_(-1, nxt, 5.0)
        return logits


def test_perplexity_by_position_shows_positions_training_never_reached() -> None:
    """Windows of max_positions tokens, bands of positions: a band the model knows nothing
    at reads as the vocabulary's size, the others as the counting rule predicts."""
    vocab, n = 10, 32
    stream = [i % vocab for i in range(5 * n + 3)]  # 5 whole windows of n + 1 tokens
    bands = perplexity_by_position(_Counting(vocab, n, known=24), stream, bands=4)  # type: ignore[arg-type]
    known = (math.exp(5) + vocab - 1) / math.exp(5)
    assert [(a, b) for a, b, _ in bands] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [p for _, _, p in bands] == pytest.approx([known] * 3 + [vocab])
    with pytest.raises(ValueError, match="fewer than 33"):
        perplexity_by_position(_Counting(vocab, n, known=n), stream[:32])  # type: ignore[arg-type]


def test_the_card_warns_of_context_that_reads_worse() -> None:
    even = [(0, 128, 33.0), (128, 256, 31.0), (256, 384, 30.5), (384, 512, 30.0)]
    assert _context_limit(even) == ""
    shipped = [(0, 128, 32.45), (128, 256, 78.2), (256, 384, 92.67), (384, 512, 95.69)]
    assert _context_limit(shipped) == (
        " Context past 128 tokens reads worse (perplexity up to 95.69 against 32.45, above): "
        "its training did not reach those positions."
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["translator", "--beam-size", "0"], ["--beam-size", "greater than or equal to 1"]),
        (["translator", "--limit", "-1"], ["--limit", "greater than or equal to 0"]),
        (["lm", "--seed", "-1"], ["--seed", "greater than or equal to 0"]),
        (["translator", "--checkpoint", "LM"], ["--checkpoint", "holds a decoder-only model"]),
        (["lm", "--checkpoint", "NONE"], ["--checkpoint", "has no config.json"]),
        (["lm", "--data", "NONE"], ["--data", "lm.test.txt not found", "make data"]),
    ],
)
def test_a_bad_option_is_a_usage_error_naming_it(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    """--beam-size 0 was DecodingOptions' ValueError, the LM's checkpoint given to
    `translator` a bare AssertionError, a missing checkpoint or test split a traceback
    (the split's only after the model had loaded); --limit -1 scored all verses but one."""
    lm = tmp_path / "lm"
    make_tiny_checkpoint(lm, "decoder-only")
    data = tmp_path / "data"
    data.mkdir()
    for split in ("test", "train"):
        (data / f"pairs.{split}.tsv").write_text("ref\tsource_module\ten\tes\n")
        (data / f"lm.{split}.txt").write_text("in the beginning\n")
    paths = {"LM": str(lm), "NONE": str(tmp_path / "none")}
    argv = [*args, "--data", str(data)] if "--data" not in args else args
    argv = [paths.get(a, a) for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", str(lm)]
    result = CliRunner().invoke(app, argv)
    said = "".join(result.output.replace("│", "").split())  # rich wraps it mid-word
    assert result.exit_code == 2, result.output
    for word in words:
        assert "".join(word.split()) in said, result.output
    assert not (tmp_path / "README.md").exists()


def test_a_test_verse_in_training_but_for_case_or_a_word_is_seen() -> None:
    """The build drops a training text only when it is the same string as a test text:
    "Y HABLÓ Jehová á Moisés, diciendo:" stayed in train beside the test verse "Y habló
    Jehová á Moisés, diciendo:" (Lev.23.9), and parallel passages a word apart stayed too."""
    train = [
        "Y HABLÓ Jehová á Moisés, diciendo:",
        "El segundo orden, una esmeralda, un zafiro, y un diamante;",
        "And the LORD spake unto Moses, saying,",
    ]
    tests = [
        "Y habló Jehová á Moisés, diciendo:",  # case and punctuation only
        "El segundo orden, una esmeralda, un zafiro y un diamante.",
        "And the LORD spake unto Aaron, saying,",  # 6 of 7 words: 0.857
        "And the LORD said unto Aaron,",  # 4 of 6 and 7 words: 0.615
        "Jesus wept.",
        "",
    ]
    assert seen_in_training(tests, train) == [True, True, True, False, False, False]
    assert seen_in_training(tests, train, threshold=1.0) == [True, True] + [False] * 4
    assert similarity(words(tests[2]), words(train[2])) == pytest.approx(12 / 14)
    with pytest.raises(ValueError, match="threshold"):
        seen_in_training(tests, train, threshold=0.0)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 1.0])
def test_seen_in_training_finds_every_near_duplicate(threshold: float) -> None:
    """The candidate filter never loses a match: the same answers as comparing every pair,
    on texts of a few words drawn from a small vocabulary (many near matches, repeats)."""
    rng = random.Random(int(threshold * 10))
    vocab = "a b c d e f g h i j k l m n o p".split()  # noqa: SIM905

    def text() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9)))

    train = [text() for _ in range(200)]
    tests = [text() for _ in range(300)]
    brute = [any(similarity(words(t), words(u)) >= threshold for u in train) for t in tests]
    assert seen_in_training(tests, train, threshold) == brute
    assert 0 < sum(brute) < len(brute)
    if threshold == 1.0:  # the card's count of identical verses, found by lookup
        assert identical_in_training(tests, train) == brute


def test_the_translator_card_scores_the_unseen_verses_apart(tmp_path: Path) -> None:
    """The card and eval.json give BLEU and chrF on every test verse and on those with no
    near-duplicate in training, and the reproduce line names --limit when one was given
    (it named none, so the command it gave scored another set of verses)."""
    checkpoint = tmp_path / "m" / "checkpoint"
    make_tiny_checkpoint(checkpoint, "encoder-decoder")
    data = tmp_path / "data"
    data.mkdir()
    pairs = load_pairs(VERSES)
    test, train = pairs[:4], pairs[10:30]
    train.append(Pair("Gen.1.1", "engKJV2006eb", test[0].en.upper(), "otra cosa"))  # seen
    write_pairs(test, data / "pairs.test.tsv")
    write_pairs(train, data / "pairs.train.tsv")
    argv = ["translator", "--checkpoint", str(checkpoint), "--data", str(data)]
    result = CliRunner().invoke(app, [*argv, "--limit", "3", "--samples", "0"])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert scores["verses"] == 3
    assert scores["unseen"]["verses"] == 2
    assert scores["unseen"]["seen_in_training"] == scores["unseen"]["identical_in_training"] == 1
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| unseen: the 2 with no near-duplicate in training |" in card
    assert "1 of the 3 test verses have a near-duplicate" in card
    assert "Reproduce: `python -m transformer.evaluate translator --limit 3`." in card
    (data / "pairs.train.tsv").unlink()
    missing = CliRunner().invoke(app, argv)
    assert missing.exit_code == 2
    assert "pairs.train.tsv" in "".join(missing.output.replace("│", "").split())


def test_the_lm_card_gives_the_perplexity_of_the_unseen_verses(tmp_path: Path) -> None:
    """Per-verse perplexity over every test verse and over those with no near-duplicate
    among the training lines (one test verse is a training line but for its case)."""
    checkpoint = tmp_path / "m" / "checkpoint"
    make_tiny_checkpoint(checkpoint, "decoder-only")
    data = tmp_path / "data"
    data.mkdir()
    english = [p.en for p in load_pairs(VERSES)]
    test, train = english[:6], [*english[10:30], english[0].lower()]
    write_lines(test, data / "lm.test.txt")
    write_lines(train, data / "lm.train.txt")
    argv = ["lm", "--checkpoint", str(checkpoint), "--data", str(data), "--samples", "0"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "m" / "eval.json").read_text())["unseen"]
    assert scores["verses"] == 5
    assert scores["seen_in_training"] == scores["identical_in_training"] == 1
    assert scores["tokens"] > 0 and scores["perplexity"] > 1
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"{scores['perplexity']} over the 5 of them with no near-duplicate" in card
    assert "1 of the 6 test verses have a near-duplicate among the training verses" in card

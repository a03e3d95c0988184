"""Score a trained checkpoint on the held-out test split and write its model card.

`python -m transformer.evaluate translator` → test BLEU/chrF (sacrebleu, with signatures)
and sample translations; `python -m transformer.evaluate lm` → test perplexity and sample
continuations. Both write `models/<name>/README.md` and `models/<name>/eval.json`.

The split holds verses out by reference, but the Bible repeats itself (parallel passages,
refrains), so some test verses have a near-duplicate in the training text. Both commands
score the whole test split and, apart, the verses with none (:func:`seen_in_training`).
"""

from __future__ import annotations

import difflib
import json
import math
import platform
import re
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import sacrebleu
import sentencepiece as spm
import torch
import typer
from tqdm import tqdm

from transformer.checkpoint import CheckpointError, load_checkpoint, tokenizer_path
from transformer.config import ConfigError
from transformer.data import load_lines, load_pairs
from transformer.decoding import DecodingOptions, generate, translate
from transformer.model import DecoderOnly, EncoderDecoder, count_parameters

app = typer.Typer(add_completion=False, help=__doc__)
M = TypeVar("M", EncoderDecoder, DecoderOnly)

# A test text counts as seen in training when a training text has this word-sequence
# similarity to it or more: 0.8 catches parallel passages that differ by a word or two.
NEAR_DUPLICATE = 0.8
NEAR_HELP = "Word-sequence similarity (0.5 to 1) from which a test verse is seen in training."
NEAR_DUPLICATE_RULE = (
    "difflib ratio ≥ {threshold} between word sequences, after NFKC, case folding and "
    "dropping punctuation"
)


def words(text: str) -> tuple[str, ...]:
    """The text's words, case-folded: case, punctuation and spacing do not tell texts apart."""
    return tuple(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


def similarity(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """2 × matching words / total words (difflib's ratio): 1.0 for the same words."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _occurrences(text: tuple[str, ...]) -> list[tuple[str, int]]:
    """Each word with its occurrence number, so a multiset intersection is a set's."""
    count: Counter[str] = Counter()
    out = []
    for word in text:
        out.append((word, count[word]))
        count[word] += 1
    return out


def seen_in_training(
    texts: list[str], training: Iterable[str], threshold: float = NEAR_DUPLICATE
) -> list[bool]:
    """For each text, whether some training text has `similarity` >= threshold to it.

    Exact, not sampled: a ratio r needs at least r·n/(2 − r) of the text's n words in
    common (matches ≤ the shorter length), so a match shares one of the text's
    n − that + 1 rarest words; only training texts holding one of those are compared.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    train = list(dict.fromkeys(words(t) for t in training))
    bags = [frozenset(_occurrences(text)) for text in train]
    postings: defaultdict[tuple[str, int], list[int]] = defaultdict(list)
    for i, bag in enumerate(bags):
        for token in bag:
            postings[token].append(i)
    seen = []
    for raw in texts:
        text = words(raw)
        n = len(text)
        bag = frozenset(_occurrences(text))
        # matches <= min(n, m) and ratio = 2 matches / (n + m): bounds on m and on matches
        need = math.ceil(threshold * n / (2 - threshold) - 1e-9)
        longest = n * (2 - threshold) / threshold + 1e-9
        rarest = sorted(bag, key=lambda t: (len(postings.get(t, ())), t))[: n - need + 1]
        candidates = {i for t in rarest for i in postings.get(t, ())}
        seen.append(
            any(
                need <= len(train[i]) <= longest
                and 2 * len(bag & bags[i]) >= threshold * (n + len(train[i])) - 1e-9
                and similarity(text, train[i]) >= threshold
                for i in candidates
            )
        )
    return seen


def identical_in_training(texts: list[str], training: Iterable[str]) -> list[bool]:
    """For each text, whether some training text has the same words (`similarity` 1.0):
    a set lookup, where seen_in_training compares candidates."""
    train = {words(t) for t in training}
    return [words(t) in train for t in texts]


def _load(
    checkpoint: Path, kind: type[M], *data_files: Path
) -> tuple[M, spm.SentencePieceProcessor]:
    """The checkpoint's model and tokenizer, once the test and train splits are there; a
    usage error naming the option otherwise (a missing checkpoint or split was a
    traceback, a model of the other kind a bare AssertionError)."""
    for data_file in data_files:
        if not data_file.is_file():
            raise typer.BadParameter(
                f"{data_file} not found: run `make data` first", param_hint="--data"
            )
    try:
        model = load_checkpoint(checkpoint)
        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_path(checkpoint)))
    except (CheckpointError, ConfigError) as error:
        raise typer.BadParameter(str(error), param_hint="--checkpoint") from None
    if not isinstance(model, kind):
        raise typer.BadParameter(
            f"{checkpoint} holds a {model.config.arch} model, not "
            f"{'an encoder-decoder' if kind is EncoderDecoder else 'a decoder-only'} one",
            param_hint="--checkpoint",
        )
    return model, tokenizer


def _training(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def translate_texts(
    model: EncoderDecoder,
    sp: spm.SentencePieceProcessor,
    texts: list[str],
    options: DecodingOptions,
    batch_size: int = 48,
) -> list[str]:
    """Translate texts in length-sorted batches (less padding), returned in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: dict[int, str] = {}
    limit = model.config.max_positions
    for start in tqdm(range(0, len(order), batch_size), desc="translate", unit="batch"):
        idx = order[start : start + batch_size]
        sources = [[*sp.encode(texts[i]), model.config.eos_id][:limit] for i in idx]
        for i, nbest in zip(idx, translate(model, sources, options), strict=True):
            out[i] = sp.decode(nbest[0].tokens)
    return [out[i] for i in range(len(texts))]


def _stages(training: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs that made the weights, first to last: a run started from another
    checkpoint's weights (`train --init-from`) keeps that one's record as init_training."""
    stages = []
    record: dict[str, Any] | None = training
    while record:
        stages.append(record)
        record = record.get("init_training")
    return stages[::-1]


def _stage(record: dict[str, Any]) -> str:
    """One run of a model's training, for the card."""
    settings = record.get("settings", {})
    block = f" on {settings['block']}-token blocks" if settings.get("block") else ""
    return (
        f"{record.get('steps', '?')} steps{block} (lr {settings.get('lr', '?')}, warm-up "
        f"{settings.get('warmup', '?')}, ≤ {settings.get('max_tokens', '?')} tokens a batch, "
        f"{record.get('wall_time_s', 0) / 60:.1f} min on {record.get('hardware', '?')})"
    )


def _trained(checkpoint: Path) -> str:
    """The card's line on how little training went in, from training.json."""
    stages = _stages(_training(checkpoint))
    if not stages or any("wall_time_s" not in t for t in stages):
        return "Small model; its training record (training.json) is missing."
    minutes = sum(t["wall_time_s"] for t in stages) / 60
    where = "; ".join(dict.fromkeys(t.get("hardware", "?") for t in stages))
    runs = f" in {len(stages)} runs" if len(stages) > 1 else ""
    return f"Small model, trained for {minutes:.0f} min{runs} ({where})."


def _card_header(name: str, checkpoint: Path, model: torch.nn.Module) -> list[str]:
    training = _training(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    settings = training.get("settings", {})
    stages = _stages(training)
    if len(stages) > 1:  # trained on in runs from each other's weights: each says its own
        parts = []
        for i, record in enumerate(stages):
            origin = f", from run {i}'s weights" if i else ""
            parts.append(f"run {i + 1}{origin}: {_stage(record)}")
        runs = "; ".join(parts)
        how = [
            f"| training | {runs} |",
            f"| last run | best dev loss at step {training.get('best_step', '?')}, epochs "
            f"completed {training.get('epochs_completed', '?')} ({training.get('device', '?')}) |",
            f"| wall time | {sum(t.get('wall_time_s', 0) for t in stages) / 60:.1f} min in all |",
        ]
    else:
        how = [
            f"| training steps | {training.get('steps', '?')} (best dev loss at step "
            f"{training.get('best_step', '?')}, epochs completed "
            f"{training.get('epochs_completed', '?')}) |",
            f"| batch | ≤ {settings.get('max_tokens', '?')} tokens, lr {settings.get('lr', '?')}, "
            f"warm-up {settings.get('warmup', '?')} |",
            f"| hardware | {training.get('hardware', '?')} ({training.get('device', '?')}) |",
            f"| wall time | {training.get('wall_time_s', 0) / 60:.1f} min |",
        ]
    return [
        f"# {name}",
        "",
        "Trained from scratch by this repository's own code (`make data && make train`).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {count_parameters(model):,} |",
        f"| architecture | {config['arch']}, d_model {config['d_model']}, {config['n_heads']} "
        f"heads, {config['n_encoder_layers']}+{config['n_decoder_layers']} layers, ffn "
        f"{config['d_ff']}, {'pre' if config['norm_first'] else 'post'}-LN, "
        f"{config['positional']} positions, {config['activation']} |",
        f"| vocabulary | {config['vocab_size']} SentencePiece unigram pieces |",
        *how,
        f"| torch | {training.get('torch', torch.__version__)} |",
        "| weights | `checkpoint/model.safetensors` (fp16), `checkpoint/config.json`, "
        "`checkpoint/tokenizer.model` |",
        "",
    ]


DATA_SPLIT = (
    "Data: public-domain Bibles from Debian's `sword-text-kjv`, `sword-text-web` and "
    "`sword-text-sparv` packages, read with `pysword` (`transformer/data.py`). The split is "
    "by a hash of the verse reference, so every version of a test verse is held out "
    "(see `data/stats.json` after `make data`), and a training text identical to a test "
    "text is dropped; texts that differ only in case, punctuation or a few words (parallel "
    "passages, refrains) remain, hence the scores without them below."
)


def _unseen_line(seen: list[bool], identical: list[bool], threshold: float, what: str) -> str:
    """The card's note on the test verses that have a near-duplicate in training."""
    rule = NEAR_DUPLICATE_RULE.format(threshold=threshold)
    return (
        f"{sum(seen)} of the {len(seen)} test verses have a near-duplicate among the "
        f"training {what} ({rule}), {sum(identical)} of them the same words."
    )


def _shown(score: float | None) -> str:
    """A score for the card; — where no verse was left to score (0.0 is a score)."""
    return "—" if score is None else str(score)


@app.command("translator")
def evaluate_translator(
    checkpoint: Path = Path("models/en-es/checkpoint"),
    data: Path = Path("data"),
    beam_size: Annotated[int, typer.Option(min=1, help="1 = greedy.")] = 1,
    limit: Annotated[int, typer.Option(min=0, help="Score only the first N verses (0 = all).")] = 0,
    samples: Annotated[int, typer.Option(min=0)] = 5,
    near: Annotated[float, typer.Option(min=0.5, max=1.0, help=NEAR_HELP)] = NEAR_DUPLICATE,
) -> None:
    """Test BLEU and chrF of the translator, on all test verses and on those unseen in
    training; writes the model card."""
    model, sp = _load(checkpoint, EncoderDecoder, data / "pairs.test.tsv", data / "pairs.train.tsv")
    pairs = load_pairs(data / "pairs.test.tsv")
    if limit:
        pairs = pairs[:limit]
    train = load_pairs(data / "pairs.train.tsv")

    def in_training(found: Callable[[list[str], list[str]], list[bool]]) -> list[bool]:
        """Found on the source side or the reference side."""
        sources = found([p.en for p in pairs], [p.en for p in train])
        targets = found([p.es for p in pairs], [p.es for p in train])
        return [a or b for a, b in zip(sources, targets, strict=True)]

    seen = in_training(lambda texts, training: seen_in_training(texts, training, near))
    identical = in_training(identical_in_training)
    options = DecodingOptions(max_new_tokens=256, beam_size=beam_size)
    start = time.monotonic()
    hyps = translate_texts(model, sp, [p.en for p in pairs], options)
    seconds = time.monotonic() - start
    refs = [p.es for p in pairs]
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hyps, [refs])
    chrf_score = chrf.corpus_score(hyps, [refs])
    unseen = [i for i, s in enumerate(seen) if not s]
    unseen_bleu = unseen_chrf = None  # no verse unseen: nothing to score (sacrebleu raises)
    if unseen:
        unseen_hyps, unseen_refs = [hyps[i] for i in unseen], [refs[i] for i in unseen]
        unseen_bleu = round(bleu.corpus_score(unseen_hyps, [unseen_refs]).score, 2)
        unseen_chrf = round(chrf.corpus_score(unseen_hyps, [unseen_refs]).score, 2)
    result = {
        "verses": len(pairs),
        "decoding": "greedy" if beam_size == 1 else f"beam {beam_size}",
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "unseen": {
            "verses": len(unseen),
            "bleu": unseen_bleu,
            "chrf": unseen_chrf,
            "seen_in_training": sum(seen),
            "identical_in_training": sum(identical),
            "rule": NEAR_DUPLICATE_RULE.format(threshold=near)
            + "; on the source or the reference, against every training pair",
        },
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "decode_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    name_dir = checkpoint.parent
    (name_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = _card_header(f"{name_dir.name}: English → Spanish translator", checkpoint, model)
    lines += [
        DATA_SPLIT,
        "Pairs: English (KJV, and WEB where its verses align) → Spanish Reina-Valera 1909.",
        "",
        "## Test scores",
        "",
        f"On {len(pairs)} held-out test verses (KJV source, RV1909 reference), "
        f"{result['decoding']} decoding, PyTorch fp32 on the CPU:",
        "",
        "| test verses | BLEU | chrF |",
        "|---|---|---|",
        f"| all {len(pairs)} | {result['bleu']} | {result['chrf']} |",
        f"| unseen: the {len(unseen)} with no near-duplicate in training "
        f"| {_shown(unseen_bleu)} | {_shown(unseen_chrf)} |",
        "",
        _unseen_line(seen, identical, near, "sources or references")
        + f" The unseen row scores the other {len(unseen)}.",
        f"sacrebleu signatures: BLEU `{result['bleu_signature']}`, "
        f"chrF `{result['chrf_signature']}`.",
        "",
        "Reproduce: `python -m transformer.evaluate translator"
        + (f" --beam-size {beam_size}" if beam_size != 1 else "")
        + (f" --limit {limit}" if limit else "")
        + (f" --near {near}" if near != NEAR_DUPLICATE else "")
        + "`.",
        "",
        "## Samples (test verses)",
        "",
    ]
    for pair, hyp in list(zip(pairs, hyps, strict=True))[:samples]:
        lines += [
            f"- **{pair.ref}** — {pair.en}",
            f"  - reference: {pair.es}",
            f"  - model: {hyp}",
        ]
    lines += [
        "",
        "## Limits",
        "",
        "Bible-domain only: archaic register, verse-length inputs (longer inputs are refused "
        f"by the service, never truncated). {_trained(checkpoint)}",
        "",
    ]
    (name_dir / "README.md").write_text("\n".join(lines))
    typer.echo(json.dumps(result, indent=2))


def perplexity_by_position(
    model: DecoderOnly, stream: list[int], bands: int = 4, batch: int = 8
) -> list[tuple[int, int, float]]:
    """Perplexity over windows of max_positions tokens cut from one stream of verses, per
    band of positions (start, end, perplexity): a position the training never reached reads
    worse than the rest, which per-verse perplexity (short texts) never shows."""
    n = model.config.max_positions
    windows = [stream[i : i + n + 1] for i in range(0, len(stream) - n, n)]
    if not windows:
        raise ValueError(f"the stream holds {len(stream)} tokens, fewer than {n + 1}")
    nll = torch.zeros(n, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            ids = torch.tensor(windows[start : start + batch])  # [B, n + 1]
            logits = model(ids[:, :-1])  # [B, n, V]
            per_token = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2),  # [B, V, n]
                ids[:, 1:],  # [B, n]
                reduction="none",
            )  # [B, n]
            nll += per_token.sum(0)  # [n]
    width = n // bands
    return [
        (a, a + width, math.exp(float(nll[a : a + width].sum()) / (width * len(windows))))
        for a in range(0, width * bands, width)
    ]


def _context_limit(by_position: list[tuple[int, int, float]]) -> str:
    """The card's warning when some band of positions reads over 1.5× worse than the best
    (learned positions past the training blocks did), else ""."""
    best = min(p for _, _, p in by_position)
    worse = [(a, p) for a, _, p in by_position if p > 1.5 * best]
    if not worse:
        return ""
    return (
        f" Context past {worse[0][0]} tokens reads worse (perplexity up to "
        f"{max(p for _, p in worse):.2f} against {best:.2f}, above): its training did not "
        "reach those positions."
    )


@app.command("lm")
def evaluate_lm(
    checkpoint: Path = Path("models/en-lm/checkpoint"),
    data: Path = Path("data"),
    samples: Annotated[int, typer.Option(min=0)] = 4,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    near: Annotated[float, typer.Option(min=0.5, max=1.0, help=NEAR_HELP)] = NEAR_DUPLICATE,
) -> None:
    """Test perplexity of the language model (per token, per verse; on all test verses and
    on those unseen in training); writes the model card."""
    model, sp = _load(checkpoint, DecoderOnly, data / "lm.test.txt", data / "lm.train.txt")
    cfg = model.config
    lines_text = load_lines(data / "lm.test.txt")
    train = load_lines(data / "lm.train.txt")
    seen = seen_in_training(lines_text, train, near)
    identical = identical_in_training(lines_text, train)
    total_nll, total_tokens = 0.0, 0
    unseen_nll, unseen_tokens = 0.0, 0
    with torch.inference_mode():
        for text, text_seen in tqdm(
            zip(lines_text, seen, strict=True), total=len(seen), desc="perplexity", unit="verse"
        ):
            ids = torch.tensor([[cfg.bos_id, *sp.encode(text), cfg.eos_id]])
            ids = ids[:, : cfg.max_positions]
            logits = model(ids[:, :-1])
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),  # [T, V]
                ids[:, 1:].reshape(-1),  # [T]
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += ids.size(1) - 1
            if not text_seen:
                unseen_nll += float(nll)
                unseen_tokens += ids.size(1) - 1
    ppl = math.exp(total_nll / total_tokens)
    unseen_ppl = round(math.exp(unseen_nll / unseen_tokens), 2) if unseen_tokens else None
    stream = [i for text in lines_text for i in (cfg.bos_id, *sp.encode(text), cfg.eos_id)]
    by_position = perplexity_by_position(model, stream)
    prompts = [" ".join(t.split()[:4]) for t in lines_text[:samples]]
    options = DecodingOptions(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=seed)
    continuations = []
    for prompt in prompts:
        out = generate(model, [[cfg.bos_id, *sp.encode(prompt)]], options)
        continuations.append(sp.decode(out[0][0].tokens))
    result = {
        "verses": len(lines_text),
        "tokens": total_tokens,
        "perplexity": round(ppl, 2),
        "unseen": {
            "verses": len(seen) - sum(seen),
            "tokens": unseen_tokens,
            "perplexity": unseen_ppl,
            "seen_in_training": sum(seen),
            "identical_in_training": sum(identical),
            "rule": NEAR_DUPLICATE_RULE.format(threshold=near) + "; against every training line",
        },
        "perplexity_by_position": {f"{a}-{b - 1}": round(p, 2) for a, b, p in by_position},
        "sampling": f"temperature 0.8, top_p 0.9, seed {seed}, 40 new tokens",
    }
    name_dir = checkpoint.parent
    (name_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    card = _card_header(f"{name_dir.name}: English language model", checkpoint, model)
    card += [
        DATA_SPLIT,
        "Text: World English Bible verses (the LM corpus of `make data`).",
        "",
        "## Test perplexity",
        "",
        f"{result['perplexity']} per SentencePiece token over {len(lines_text)} held-out test "
        f"verses ({total_tokens} tokens incl. end-of-verse), PyTorch fp32; "
        f"{_shown(unseen_ppl)} over the {len(seen) - sum(seen)} of them with no "
        f"near-duplicate in training. Reproduce: `python -m transformer.evaluate lm"
        + (f" --near {near}" if near != NEAR_DUPLICATE else "")
        + "`.",
        "",
        _unseen_line(seen, identical, near, "verses"),
        "",
        f"Over the same verses run together, cut into windows of {cfg.max_positions} tokens "
        "(every position the model takes), by position: "
        + ", ".join(f"{a}–{b - 1}: {p:.2f}" for a, b, p in by_position)
        + ". A position its training never reached would read far worse than the rest.",
        "",
        f"## Samples ({result['sampling']})",
        "",
    ]
    for prompt, cont in zip(prompts, continuations, strict=True):
        card.append(f"- *{prompt}* → {cont}")
    limits = f"Bible-domain English only. {_trained(checkpoint)}{_context_limit(by_position)}"
    card += ["", "## Limits", "", limits, ""]
    (name_dir / "README.md").write_text("\n".join(card))
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()

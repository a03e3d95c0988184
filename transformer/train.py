"""Train our default models: `python -m transformer.train translator|lm`.

AdamW with linear warm-up and inverse-square-root decay (the paper's schedule), label
smoothing, token-based batching (batches of similar lengths up to --max-tokens), gradient
clipping, periodic dev loss (and dev BLEU for the translator), resumable checkpoints.
Training state for resume lives in --work-dir; the model to ship is written to --out.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any

import sacrebleu
import sentencepiece as spm
import torch
import typer
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transformer.config import TransformerConfig
from transformer.data import load_lines, load_pairs
from transformer.decoding import DecodingOptions, translate
from transformer.model import EncoderDecoder, Model, build_model, count_parameters

app = typer.Typer(add_completion=False, help=__doc__)

TRANSLATOR = TransformerConfig(
    arch="encoder-decoder",
    vocab_size=8000,
    d_model=256,
    n_heads=4,
    n_encoder_layers=3,
    n_decoder_layers=3,
    d_ff=1024,
    dropout=0.1,
    max_positions=512,
    # Post-LN without a final norm: the paper's layout, and exactly Hugging Face Marian's,
    # so the same weights run in transformers and CTranslate2 for the benchmarks.
    norm_first=False,
    final_norm=False,
    activation="relu",
    positional="sinusoidal",
)
LANGUAGE_MODEL = TransformerConfig(
    arch="decoder-only",
    vocab_size=8000,
    d_model=256,
    n_heads=4,
    n_encoder_layers=0,
    n_decoder_layers=4,
    d_ff=1024,
    dropout=0.1,
    max_positions=512,
    norm_first=True,
    activation="gelu",
    positional="learned",
    scale_embeddings=False,
)


@dataclass
class Example:
    """One training example: source ids (empty for the LM) and target ids."""

    source: list[int]
    target: list[int]


@dataclass
class TrainSettings:
    max_tokens: int
    lr: float
    warmup: int
    label_smoothing: float
    clip: float
    max_steps: int
    max_minutes: float
    eval_every: int
    seed: int
    device: str
    # bf16 autocast (fp32 master weights): ~5x faster on CPUs with AVX512-BF16/AMX.
    amp: bool = True
    # The LM's tokens per training sequence (the translator trains on whole verses).
    block: int | None = None


def make_batches(
    examples: list[Example], max_tokens: int, rng: random.Random
) -> list[list[Example]]:
    """Group examples of similar length so a batch holds at most max_tokens padded tokens.

    Sort by length (with random tie-break so epochs differ), cut greedily, shuffle batches.
    """
    order = sorted(examples, key=lambda e: (len(e.source), len(e.target), rng.random()))
    batches: list[list[Example]] = []
    batch: list[Example] = []
    longest = 0
    for example in order:
        length = max(len(example.source), len(example.target))
        if batch and max(longest, length) * (len(batch) + 1) * (2 if example.source else 1) > (
            max_tokens
        ):
            batches.append(batch)
            batch, longest = [], 0
        batch.append(example)
        longest = max(longest, length)
    if batch:
        batches.append(batch)
    rng.shuffle(batches)
    return batches


def pad(rows: list[list[int]], pad_id: int, device: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)


def batch_loss(
    model: Model, batch: list[Example], label_smoothing: float, device: str
) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy over the batch's real target tokens, and their count."""
    cfg = model.config
    if isinstance(model, EncoderDecoder):
        src = pad([e.source for e in batch], cfg.pad_id, device)
        tgt_in = pad([[cfg.decoder_start_id, *e.target] for e in batch], cfg.pad_id, device)
        tgt_out = pad([[*e.target, cfg.eos_id] for e in batch], cfg.pad_id, device)
        logits = model(src, tgt_in)
    else:
        ids = pad([e.target for e in batch], cfg.pad_id, device)
        tgt_out = ids[:, 1:]
        logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # [B*T, V]
        tgt_out.reshape(-1),  # [B*T]
        ignore_index=cfg.pad_id,
        label_smoothing=label_smoothing,
    )
    return loss, int((tgt_out != cfg.pad_id).sum())


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then decay with 1/sqrt(step)."""
    step = max(step, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


@torch.inference_mode()
def dev_loss(
    model: Model, examples: list[Example], max_tokens: int, device: str, amp: bool
) -> float:
    """Token-level cross-entropy (no smoothing) over the dev set."""
    model.eval()
    total, count = 0.0, 0
    for batch in make_batches(examples, max_tokens, random.Random(0)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss, n = batch_loss(model, batch, 0.0, device)
        total += float(loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def dev_bleu(
    model: EncoderDecoder,
    sp: spm.SentencePieceProcessor,
    sources: list[str],
    references: list[str],
    batch_size: int = 32,
) -> tuple[float, float, list[str]]:
    """Greedy-decode `sources` and score against `references` (sacrebleu BLEU, chrF)."""
    model.eval()
    hypotheses: list[str] = []
    options = DecodingOptions(max_new_tokens=256)
    for i in range(0, len(sources), batch_size):
        chunk = [
            [*sp.encode(s), model.config.eos_id][: model.config.max_positions]
            for s in sources[i : i + batch_size]
        ]
        for nbest in translate(model, chunk, options):
            hypotheses.append(sp.decode(nbest[0].tokens))
    model.train()
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    return bleu.score, chrf.score, hypotheses


def _state_paths(work_dir: Path) -> tuple[Path, Path, Path]:
    return work_dir / "model", work_dir / "optimizer.safetensors", work_dir / "state.json"


def _save_state(
    work_dir: Path, model: Model, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Everything resume needs: fp32 weights, AdamW moments, step counters, RNG seed."""
    model_dir, opt_path, state_path = _state_paths(work_dir)
    save_checkpoint(model, model_dir)
    tensors: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for param, pstate in optimizer.state.items():
        name = names[id(param)]
        for key, value in pstate.items():
            tensors[f"{name}::{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    save_file(tensors, str(opt_path))
    state_path.write_text(json.dumps(state, indent=2))


def _load_state(work_dir: Path, optimizer: torch.optim.Optimizer, model: Model) -> dict[str, Any]:
    _, opt_path, state_path = _state_paths(work_dir)
    tensors = load_file(str(opt_path))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field = key.split("::")
        param = params[name]
        optimizer.state[param][field] = value.to(param.device)
    state: dict[str, Any] = json.loads(state_path.read_text())
    return state


def run_training(
    kind: str,
    config: TransformerConfig,
    train: list[Example],
    dev: list[Example],
    settings: TrainSettings,
    out: Path,
    work_dir: Path,
    tokenizer: Path,
    resume: bool,
    dev_texts: tuple[list[str], list[str]] | None = None,
    sp: spm.SentencePieceProcessor | None = None,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """The training loop shared by both models; returns the training record. `init_from`:
    a checkpoint to start from (its weights, grown to config's positions, with a fresh
    optimizer), instead of a new model."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    device = settings.device
    model: Model
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_dev_loss": None, "elapsed_s": 0.0}
    if init_from is not None:  # kept in state.json, so a resumed run records them too
        state["init_from"] = str(init_from)
        base = init_from / "training.json"
        state["init_training"] = json.loads(base.read_text()) if base.is_file() else None
    resuming = resume and _state_paths(work_dir)[2].is_file()
    if resuming:
        model = load_checkpoint(_state_paths(work_dir)[0], device)
        _check_resumable(model.config, config, work_dir)
        config = model.config
    elif init_from is not None:
        model = _grown(init_from, config).to(device)
        config = model.config
    else:
        model = build_model(config).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
        eps=1e-9,
    )
    if resuming:
        state = _load_state(work_dir, optimizer, model)
        rng = random.Random(settings.seed + state["epoch"])
        typer.echo(f"resumed from {work_dir} at step {state['step']}")
    history: list[dict[str, Any]] = state.setdefault("history", [])
    n_params = count_parameters(model)
    typer.echo(f"{kind}: {n_params / 1e6:.2f}M parameters, {len(train)} training examples")
    start = time.monotonic() - state["elapsed_s"]
    budget_s = settings.max_minutes * 60
    # A resumed run that had reached its step or time limit trains no further (it trained
    # one more step, and saved it over the shipped checkpoint when dev loss fell).
    done = state["step"] >= settings.max_steps or state["elapsed_s"] >= budget_s
    progress = tqdm(total=settings.max_steps, initial=state["step"], desc=kind, unit="step")
    while not done:
        for batch in make_batches(train, settings.max_tokens, rng):
            step = state["step"] + 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings.lr, settings.warmup)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=settings.amp):
                loss, _ = batch_loss(model, batch, settings.label_smoothing, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
            optimizer.step()
            state["step"] = step
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", epoch=state["epoch"])
            out_of_time = time.monotonic() - start >= budget_s
            done = step >= settings.max_steps or out_of_time
            if step % settings.eval_every == 0 or done:
                state["elapsed_s"] = time.monotonic() - start
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": state["epoch"],
                    "train_loss": round(loss.item(), 4),
                    "dev_loss": round(
                        dev_loss(model, dev, settings.max_tokens, device, settings.amp), 4
                    ),
                    "elapsed_s": round(state["elapsed_s"], 1),
                }
                if dev_texts is not None and sp is not None and isinstance(model, EncoderDecoder):
                    bleu, chrf, _ = dev_bleu(model, sp, *dev_texts)
                    record.update(dev_bleu=round(bleu, 2), dev_chrf=round(chrf, 2))
                history.append(record)
                tqdm.write(json.dumps(record))
                best = state["best_dev_loss"]
                if best is None or record["dev_loss"] < best:
                    state["best_dev_loss"] = record["dev_loss"]
                    state["best_step"] = step
                    save_checkpoint(model, out, tokenizer, dtype=torch.float16)
                _save_state(work_dir, model, optimizer, state)
            if done:
                break
        else:
            state["epoch"] += 1
    progress.close()
    training = {
        "kind": kind,
        "parameters": n_params,
        "steps": state["step"],
        "epochs_completed": state["epoch"],
        "best_step": state.get("best_step"),
        "best_dev_loss": state["best_dev_loss"],
        "wall_time_s": round(state["elapsed_s"], 1),
        "device": device,
        "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "settings": settings.__dict__,
        "init_from": state.get("init_from"),
        "init_training": state.get("init_training"),  # how the weights it began with were made
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return training


def _check_resumable(saved: TransformerConfig, wanted: TransformerConfig, work_dir: Path) -> None:
    """A run resumed from `work_dir` trains the model saved there: refused where this run's
    data does not fit it (another --block: the LM's inputs outrun its positions, an
    IndexError after the data had loaded; another tokenizer: ids past its vocabulary)."""
    changed = [
        f"{key} {getattr(saved, key)} -> {getattr(wanted, key)}"
        for key in ("arch", "vocab_size", "max_positions")
        if getattr(saved, key) != getattr(wanted, key)
    ]
    if changed:
        raise typer.BadParameter(
            f"{work_dir} holds a run of another model ({', '.join(changed)}): give this run "
            "its own --work-dir, or pass --no-resume to start it there anew",
            param_hint="--work-dir",
        )


def _sp(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise typer.BadParameter(f"{path} not found: run `make data` first")
    return spm.SentencePieceProcessor(model_file=str(path))


def _settings(options: dict[str, Any]) -> TrainSettings:
    """TrainSettings from a command's options (the parameters of the same names)."""
    kwargs = {f.name: options[f.name] for f in fields(TrainSettings) if f.name in options}
    if kwargs["device"] == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda asked for, but torch sees no CUDA device")
    # Refused before any data is read: AdamW raises on a negative rate, and a clip norm
    # <= 0 turns every gradient to zero (or flips its sign) without a word.
    for name in ("lr", "clip"):
        if not kwargs[name] > 0:
            raise typer.BadParameter(f"must be > 0, got {kwargs[name]}", param_hint=f"--{name}")
    return TrainSettings(**kwargs)


DataOpt = Annotated[Path, typer.Option(help="Output folder of `make data`.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
# Bounds checked as the options are parsed: 0 warm-up steps or evaluation interval was a
# ZeroDivisionError (the latter after the first step), a --block < 1 a ConfigError.
Positive = Annotated[int, typer.Option(min=1)]
Smoothing = Annotated[float, typer.Option(min=0.0, max=1.0)]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default).")]


@app.command("translator")
def train_translator(
    data: DataOpt = Path("data"),
    out: Annotated[Path, typer.Option(help="Where the shipped model goes.")] = Path(
        "models/en-es/checkpoint"
    ),
    work_dir: Annotated[Path, typer.Option(help="Resumable state.")] = Path("runs/translator"),
    max_tokens: Positive = 6000,
    lr: float = 7e-4,
    warmup: Positive = 1000,
    label_smoothing: Smoothing = 0.1,
    clip: float = 1.0,
    max_steps: Positive = 12000,
    max_minutes: Annotated[float, typer.Option(help="Stop after this wall time.")] = 600.0,
    eval_every: Positive = 500,
    dev_bleu_verses: Annotated[int, typer.Option(min=0)] = 200,
    max_len: Annotated[int, typer.Option(min=1, help="Drop longer pairs (tokens).")] = 160,
    seed: int = 1,
    device: DeviceOpt = "cpu",
    amp: Annotated[bool, typer.Option(help="bf16 autocast.")] = True,
    resume: bool = True,
    threads: ThreadsOpt = 0,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from this checkpoint's weights (a fresh optimizer and warm-up), e.g. "
            "to go on training a model its --max-minutes stopped while dev loss still fell."
        ),
    ] = None,
) -> None:
    """Train the English→Spanish translator."""
    settings = _settings(locals())
    if threads:
        torch.set_num_threads(threads)
    tokenizer = data / "spm" / "translator.model"
    sp = _sp(tokenizer)
    config = replace(TRANSLATOR, vocab_size=sp.get_piece_size())

    def encode(path: Path) -> tuple[list[Example], list[str], list[str]]:
        pairs = load_pairs(path)
        examples = [Example([*sp.encode(p.en), config.eos_id], sp.encode(p.es)) for p in pairs]
        keep = [i for i, e in enumerate(examples) if max(len(e.source), len(e.target)) < max_len]
        if len(keep) < len(examples):
            typer.echo(f"{path}: dropped {len(examples) - len(keep)} pairs over {max_len} tokens")
        return (
            [examples[i] for i in keep],
            [pairs[i].en for i in keep],
            [pairs[i].es for i in keep],
        )

    train, _, _ = encode(data / "pairs.train.tsv")
    dev, dev_en, dev_es = encode(data / "pairs.dev.tsv")
    for split, kept in (("train", train), ("dev", dev)):
        if not kept:
            raise typer.BadParameter(
                f"no {split} pair is under {max_len} tokens: raise it", param_hint="--max-len"
            )
    run_training(
        "translator",
        config,
        train,
        dev,
        settings,
        out,
        work_dir,
        tokenizer,
        resume,
        dev_texts=(dev_en[:dev_bleu_verses], dev_es[:dev_bleu_verses]),
        sp=sp,
        init_from=init_from,
    )


@app.command("lm")
def train_lm(
    data: DataOpt = Path("data"),
    out: Annotated[Path, typer.Option(help="Where the shipped model goes.")] = Path(
        "models/en-lm/checkpoint"
    ),
    work_dir: Annotated[Path, typer.Option(help="Resumable state.")] = Path("runs/lm"),
    block: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tokens per training sequence; also the model's max_positions, so that "
            "every learned position it accepts is one it was trained on.",
        ),
    ] = LANGUAGE_MODEL.max_positions,
    max_tokens: Positive = 8192,
    lr: float = 1e-3,
    warmup: Positive = 500,
    label_smoothing: Smoothing = 0.0,
    clip: float = 1.0,
    max_steps: Positive = 6000,
    max_minutes: Annotated[float, typer.Option(help="Stop after this wall time.")] = 600.0,
    eval_every: Positive = 500,
    seed: int = 1,
    device: DeviceOpt = "cpu",
    amp: Annotated[bool, typer.Option(help="bf16 autocast.")] = True,
    resume: bool = True,
    threads: ThreadsOpt = 0,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from this checkpoint's weights (a fresh optimizer and warm-up), e.g. "
            "to go on training a model of shorter blocks on --block ones: its learned "
            "position table grows to --block, the new rows initialised as a new model's."
        ),
    ] = None,
) -> None:
    """Train the English language model on verse text packed into fixed-size blocks."""
    settings = _settings(locals())
    if threads:
        torch.set_num_threads(threads)
    tokenizer = data / "spm" / "lm.model"
    sp = _sp(tokenizer)
    # Training inputs are `block` tokens at positions 0 .. block - 1: a learned position
    # table longer than that keeps rows at their random init, which generation and the
    # service would then use (perplexity doubles past the block).
    config = replace(LANGUAGE_MODEL, vocab_size=sp.get_piece_size(), max_positions=block)

    def blocks(path: Path) -> list[Example]:
        stream: list[int] = []
        for line in load_lines(path):
            stream += [config.bos_id, *sp.encode(line), config.eos_id]
        return [Example([], stream[i : i + block + 1]) for i in range(0, len(stream) - 1, block)]

    run_training(
        "lm",
        config,
        blocks(data / "lm.train.txt"),
        blocks(data / "lm.dev.txt"),
        settings,
        out,
        work_dir,
        tokenizer,
        resume,
        init_from=init_from,
    )


def _grown(checkpoint: Path, config: TransformerConfig) -> Model:
    """The checkpoint's model with its positions grown to config.max_positions (a learned
    table keeps its rows, the new ones made as build_model makes them), refused where it
    is not a model `config` could continue."""
    try:
        base = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise typer.BadParameter(str(error), param_hint="--init-from") from None
    have, want = base.config, config
    if have.vocab_size != want.vocab_size or have.arch != want.arch:
        raise typer.BadParameter(
            f"{checkpoint} is a {have.arch} model of {have.vocab_size} tokens; this run "
            f"trains a {want.arch} model of {want.vocab_size} (the tokenizer's)",
            param_hint="--init-from",
        )
    if have.max_positions > want.max_positions:
        raise typer.BadParameter(
            f"{checkpoint} has {have.max_positions} positions; it can only grow to --block "
            f"{want.max_positions}, not shrink (its trained rows would go)",
            param_hint="--init-from",
        )
    model = build_model(replace(have, max_positions=want.max_positions))
    state = base.state_dict()
    for name, table in model.state_dict().items():
        if state[name].shape != table.shape:  # the position table: keep its trained rows
            grown = table.clone()
            grown[: state[name].shape[0]] = state[name]
            state[name] = grown
    model.load_state_dict(state)
    return model


__all__ = ["LANGUAGE_MODEL", "TRANSLATOR", "app", "learning_rate", "make_batches", "run_training"]

if __name__ == "__main__":
    app()

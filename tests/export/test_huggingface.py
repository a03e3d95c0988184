"""Hugging Face interop: imported Marian / GPT-2 weights compute what transformers computes,
and our exported Marian directory runs identically in transformers and CTranslate2.

Why: the benchmarks compare engines on the same weights; a silently wrong mapping (a
transposed Conv1D, a swapped LayerNorm, an off-by-one position) would compare different
models. Everything is tiny and random-initialised; nothing is downloaded. Tests that need
transformers / ctranslate2 skip without them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from export.huggingface import (
    BANNED_LOGIT_BIAS,
    MarianVocab,
    UnsupportedCheckpoint,
    export_marian,
    import_gpt2,
    import_marian,
    save_imported,
)
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.config import TransformerConfig
from transformer.decoding import DecodingOptions, translate
from transformer.model import DecoderOnly, EncoderDecoder, build_model

# MarianTokenizer asks for sacremoses (punctuation normalisation); our ids do not use it.
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

ATOL = 1e-4
VOCAB = 100
MAX_NEW = 12
COPY_HIGH = 20  # the tiny translators learn to copy ids 4 .. COPY_HIGH - 1


def _transformers() -> Any:
    return pytest.importorskip("transformers", reason="transformers is an optional extra (peers)")


def _perturb(model: torch.nn.Module, scale: float, seed: int, skip: str = "") -> None:
    """Random weights of order 1, so logits differ clearly between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip and skip in name:
                continue
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _train_spm(path: Path, pad_id: int, unk_id: int, bos_id: int, eos_id: int) -> Path:
    """A 100-piece SentencePiece model trained on made-up words, in well under a second."""
    rng = random.Random(0)
    letters = "abcdefghijklmnoprstu"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(80)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=VOCAB,
        minloglevel=2,
        pad_id=pad_id,
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
    )
    path.write_bytes(buffer.getvalue())
    return path


def _ids(rows: list[int], seed: int, low: int = 4, high: int = VOCAB - 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in rows]


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _tiny_marian_dir(
    tmp: Path, activation: str, share: bool, fmt: str, bad_words: bool
) -> tuple[Any, Path]:
    transformers = _transformers()
    config = transformers.MarianConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        activation_function=activation,
        scale_embedding=True,
        share_encoder_decoder_embeddings=share,
        pad_token_id=VOCAB - 1,
        eos_token_id=0,
        decoder_start_token_id=VOCAB - 1,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    _perturb(model, 0.3, seed=1, skip="embed_positions")
    with torch.no_grad():
        model.final_logits_bias.normal_()
    directory = tmp / "hf"
    model.save_pretrained(directory)
    if fmt == "bin":  # the older format: a state dict read back with weights_only=True
        state = load_file(str(directory / "model.safetensors"))
        torch.save(state, directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    if bad_words:
        gen = json.loads((directory / "generation_config.json").read_text())
        gen["bad_words_ids"] = [[VOCAB - 1]]
        (directory / "generation_config.json").write_text(json.dumps(gen))
    return model, directory


@pytest.mark.parametrize(
    ("activation", "share", "fmt", "bad_words"),
    [("relu", True, "safetensors", False), ("swish", False, "bin", True)],
)
def test_imported_marian_logits_match_transformers(
    tmp_path: Path, activation: str, share: bool, fmt: str, bad_words: bool
) -> None:
    hf, directory = _tiny_marian_dir(tmp_path, activation, share, fmt, bad_words)
    config, state = import_marian(directory)
    assert (config.norm_first, config.final_norm, config.share_embeddings) == (False, False, share)
    assert config.pad_id == config.decoder_start_id == VOCAB - 1 and config.eos_id == 0
    ours = build_model(config).eval()
    ours.load_state_dict(state, strict=True)
    assert isinstance(ours, EncoderDecoder)

    src, src_mask = _padded([[*r, 0] for r in _ids([7, 4], seed=2)], pad=VOCAB - 1)
    tgt = torch.tensor([[VOCAB - 1, *r] for r in _ids([5, 5], seed=3)])  # starts with pad
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        got = ours(src, tgt)
    if bad_words:  # folded into the bias, so our decoders never emit it either
        assert bool((got[..., VOCAB - 1] < BANNED_LOGIT_BIAS / 2).all())
        got, expected = got[..., : VOCAB - 1], expected[..., : VOCAB - 1]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    saved = load_checkpoint(save_imported(directory, tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(saved(src, tgt), ours(src, tgt), atol=0, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_imported_gpt2_logits_match_transformers(tmp_path: Path, tied: bool) -> None:
    transformers = _transformers()
    hf_config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        layer_norm_epsilon=1e-6,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    _perturb(hf, 0.3, seed=1)
    hf.save_pretrained(tmp_path / "hf")

    config, state = import_gpt2(tmp_path / "hf")
    assert (config.activation, config.d_ff, config.layer_norm_eps) == ("gelu_tanh", 48, 1e-6)
    assert config.tie_output == tied
    ours = build_model(config).eval()
    ours.load_state_dict(state, strict=True)
    assert isinstance(ours, DecoderOnly)
    ids = torch.tensor(_ids([12, 12], seed=4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)


def _our_checkpoint(
    tmp: Path,
    activation: str = "relu",
    marian_ids: bool = False,
    train: bool = False,
    **overrides: Any,
) -> tuple[EncoderDecoder, Path]:
    """A tiny post-LN translator with a trained 100-piece tokenizer, saved as ours.

    marian_ids: Marian's conventions (eos 0, unk 1, pad = decoder start = last id, pad
    never generated), which CTranslate2's Marian converter assumes.
    """
    if marian_ids:
        tokenizer = _train_spm(tmp / "spm.model", pad_id=VOCAB - 1, unk_id=1, bos_id=-1, eos_id=0)
        ids = dict(pad_id=VOCAB - 1, unk_id=1, bos_id=VOCAB - 1, eos_id=0)
        ids["decoder_start_id"] = VOCAB - 1
    else:
        tokenizer = _train_spm(tmp / "spm.model", pad_id=0, unk_id=1, bos_id=2, eos_id=3)
        ids = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, decoder_start_id=2)
    fields: dict[str, Any] = dict(
        arch="encoder-decoder",
        vocab_size=VOCAB,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_positions=64,
        norm_first=False,
        final_norm=False,
        activation=activation,
        final_logits_bias=True,
        **ids,
    )
    fields.update(overrides)
    config = TransformerConfig(**fields)
    torch.manual_seed(0)
    model = build_model(config)
    assert isinstance(model, EncoderDecoder)
    _perturb(model, 0.1, seed=5)
    if train:
        _train_copy(model)
    with torch.no_grad():
        model.src_embed.token.weight[config.pad_id].zero_()
        if marian_ids:
            assert model.generator.final_logits_bias is not None
            model.generator.final_logits_bias[config.pad_id] = BANNED_LOGIT_BIAS
    return model.eval(), save_checkpoint(model, tmp / "ckpt", tokenizer=tokenizer)


def _train_copy(model: EncoderDecoder, steps: int = 100) -> None:
    """~2 s of training to copy ids 4..19: a random Transformer repeats one token forever,
    which would make the greedy comparisons below nearly vacuous."""
    config = model.config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend with each other
    try:
        _train_steps(model, config, steps)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: EncoderDecoder, config: TransformerConfig, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    eos = torch.full((32, 1), config.eos_id)
    start = torch.full((32, 1), config.decoder_start_id)
    for _ in range(steps):
        ids = torch.randint(4, COPY_HIGH, (32, 6), generator=g)
        logits = model(torch.cat([ids, eos], 1), torch.cat([start, ids], 1))
        loss = F.cross_entropy(logits.flatten(0, 1), torch.cat([ids, eos], 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # Marian's pad row stays zero (CTranslate2 relies on it)
            model.src_embed.token.weight[config.pad_id].zero_()


def _sources(config: TransformerConfig) -> list[list[int]]:
    return [[*row, config.eos_id] for row in _ids([6, 3, 5], seed=6, low=4, high=COPY_HIGH)]


def _ours_greedy(model: EncoderDecoder, sources: list[list[int]]) -> list[list[int]]:
    hyps = translate(model, sources, DecodingOptions(max_new_tokens=MAX_NEW))
    return [h[0].tokens for h in hyps]


def test_export_import_round_trip_is_exact(tmp_path: Path) -> None:
    model, ckpt = _our_checkpoint(tmp_path)
    out = export_marian(ckpt, tmp_path / "marian")
    config, state = import_marian(out)
    assert config == model.config
    theirs = model.state_dict()
    assert set(state) == set(theirs)
    for name, tensor in state.items():
        assert torch.equal(tensor, theirs[name]), name


def test_an_import_over_a_checkpoint_leaves_no_tokenizer_of_the_old_one(tmp_path: Path) -> None:
    """Imported into a folder that held another checkpoint, its tokenizer.model stayed:
    `python -m export` published it with the Marian weights, so the service numbered the
    pieces as that tokenizer does, not as vocab.json (48 of 55 ids read as other pieces
    here), and translated wrong without a word."""
    from export.onnx_export import ExportError, export_checkpoint
    from export.testing import make_tiny_checkpoint

    _, ckpt = _our_checkpoint(tmp_path)
    hf = export_marian(ckpt, tmp_path / "marian")
    target = tmp_path / "en-es" / "checkpoint"
    make_tiny_checkpoint(target, "encoder-decoder", vocab_size=VOCAB)
    save_imported(hf, target)
    assert not (target / "tokenizer.model").exists()
    assert (target / "vocab.json").is_file()
    with pytest.raises(ExportError, match=r"has no tokenizer\.model"):
        export_checkpoint(target, tmp_path / "en-es" / "1", ["fp32"], exporter="torchscript")


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_exported_marian_runs_identically_in_transformers(tmp_path: Path, activation: str) -> None:
    transformers = _transformers()
    trained = activation == "relu"  # one trained model is enough for the greedy check
    model, ckpt = _our_checkpoint(tmp_path, activation, train=trained)
    config = model.config
    out = export_marian(ckpt, tmp_path / "marian")
    hf = transformers.MarianMTModel.from_pretrained(out).eval()

    sources = _sources(config)
    src, src_mask = _padded(sources, config.pad_id)
    tgt = torch.tensor([[config.decoder_start_id, *r] for r in _ids([6, 6, 6], seed=7)])
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        torch.testing.assert_close(model(src, tgt), expected, atol=ATOL, rtol=0)
        generated = hf.generate(
            input_ids=src,
            attention_mask=src_mask,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            num_beams=1,
        )
    theirs = []
    for row in generated.tolist():
        assert row[0] == config.decoder_start_id
        row = row[1:]
        theirs.append(row[: row.index(config.eos_id)] if config.eos_id in row else row)
    ours = _ours_greedy(model, sources)
    if trained:
        assert len({t for row in ours for t in row}) > 3, ours  # not a degenerate repetition
    assert theirs == ours

    # The tokenizer numbers pieces exactly as ours does, and MarianVocab (the serving
    # contract for imported Marian checkpoints) agrees with both.
    tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    text = sp.decode(_ids([8], seed=8)[0])
    assert tokenizer(text).input_ids == [*sp.encode(text), config.eos_id]
    vocab = MarianVocab(save_imported(out, tmp_path / "reimported"))
    assert vocab.encode_source(text) == tokenizer(text).input_ids
    assert vocab.decode(vocab.encode_source(text)) == sp.decode(sp.encode(text))


def test_ctranslate2_converts_the_export_and_decodes_identically(tmp_path: Path) -> None:
    _transformers()
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is optional (peers)")
    model, ckpt = _our_checkpoint(tmp_path, marian_ids=True, train=True)
    out = export_marian(ckpt, tmp_path / "marian", ctranslate2=True)
    converted = ctranslate2.converters.TransformersConverter(str(out)).convert(
        str(tmp_path / "ct2"), force=True
    )
    translator = ctranslate2.Translator(converted, device="cpu", compute_type="float32")
    pieces = json.loads((out / "vocab.json").read_text())
    by_id = {i: p for p, i in pieces.items()}
    sources = _sources(model.config)
    results = translator.translate_batch(
        [[by_id[i] for i in s] for s in sources], beam_size=1, max_decoding_length=MAX_NEW
    )
    theirs = [[pieces[p] for p in r.hypotheses[0]] for r in results]
    ours = _ours_greedy(model, sources)
    assert len({t for row in ours for t in row}) > 3, ours  # not a degenerate repetition
    assert theirs == ours


def _write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


MARIAN = {"model_type": "marian", "vocab_size": 100, "d_model": 32, "encoder_layers": 1,
          "decoder_layers": 1, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
          "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
          "pad_token_id": 99, "decoder_start_token_id": 99, "eos_token_id": 0}  # fmt: skip
GPT2 = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 1, "n_head": 4,
        "n_positions": 32, "bos_token_id": 99, "eos_token_id": 99}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("marian", {"activation_function": "quick_gelu"}, "activation_function"),
        ("marian", {"normalize_before": True}, "normalize_before"),
        ("marian", {"add_bias_logits": True}, "add_bias_logits"),
        ("marian", {"decoder_ffn_dim": 128}, "decoder_ffn_dim"),
        (
            "marian",
            {"share_encoder_decoder_embeddings": False, "decoder_vocab_size": 120},
            "decoder_vocab_size",
        ),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"activation_function": "quick_gelu"}, "activation_function"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
        ("gpt2", {"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_hf_options_are_refused_by_name(
    tmp_path: Path, kind: str, change: dict[str, Any], named: str
) -> None:
    base = MARIAN if kind == "marian" else GPT2
    directory = _write_config(tmp_path / "hf", {**base, **change})
    load = import_marian if kind == "marian" else import_gpt2
    with pytest.raises(UnsupportedCheckpoint, match=named):
        load(directory)


@pytest.mark.parametrize(
    ("file", "content", "said"),
    [
        ("config.json", b"{not json", "config.json is not valid JSON"),
        ("config.json", b"\xff\xfe", "config.json is not valid JSON"),
        ("model.safetensors", b"cut short", "cannot read"),
        ("pytorch_model.bin", b"not a pickle", "weights_only=True refuses it"),
        ("pytorch_model.bin", b"", "cannot read"),
    ],
)
def test_an_unreadable_hugging_face_file_is_one_line_naming_it(
    tmp_path: Path, file: str, content: bytes, said: str
) -> None:
    """A config.json that is not JSON, or a weights file cut short or not weights, was the
    reader's own exception (JSONDecodeError, SafetensorError, UnpicklingError, EOFError),
    which the CLI let through as a traceback."""
    from typer.testing import CliRunner

    from export.huggingface import app

    directory = _write_config(tmp_path / "hf", MARIAN)
    (directory / file).write_bytes(content)
    result = CliRunner().invoke(app, ["import-marian", str(directory), str(tmp_path / "ours")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    assert said in result.output and file in result.output, result.output


def test_unplaceable_tensors_are_refused(tmp_path: Path) -> None:
    """A tensor we would drop (e.g. a pre-LN variant's embedding LayerNorm) is refused."""
    _, ckpt = _our_checkpoint(tmp_path)
    out = export_marian(ckpt, tmp_path / "marian")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.encoder.layernorm_embedding.weight"] = torch.ones(32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpoint, match="layernorm_embedding"):
        import_marian(out)


@pytest.mark.parametrize(
    ("overrides", "ctranslate2", "named"),
    [
        ({"norm_first": True}, False, "norm_first"),
        ({"final_norm": True}, False, "final_norm"),
        ({"positional": "learned"}, False, "positional"),
        ({"share_embeddings": False}, False, "share_embeddings"),
        ({}, True, "decoder_start_id"),
        ({"decoder_start_id": 0}, True, "pad_id"),
    ],
)
def test_unsupported_exports_are_refused_by_name(
    tmp_path: Path, overrides: dict[str, Any], ctranslate2: bool, named: str
) -> None:
    _, ckpt = _our_checkpoint(tmp_path, **overrides)
    with pytest.raises(UnsupportedCheckpoint, match=named):
        export_marian(ckpt, tmp_path / "marian", ctranslate2=ctranslate2)

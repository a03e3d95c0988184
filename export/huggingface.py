"""Hugging Face interop: import Marian / GPT-2 checkpoints, export ours as Marian.

Why: the benchmarks compare our engine with peers (transformers `generate`, CTranslate2) on
*exactly the same weights*, and published Marian or GPT-2 weights load into our model with
no retraining (to evaluate or train on; the server cannot serve them yet: it reads only a
SentencePiece `tokenizer.model`, which they lack, below). Everything here reads and writes
plain files (config.json, safetensors or a `.bin` loaded with `weights_only=True`);
`transformers` is never imported, so importing and exporting work in the training image
without it. Tests use it, when installed, to check that our logits equal transformers' on
tiny random models.

Mappings (ours <- Hugging Face):

* Marian (`MarianMTModel`): post-LN (`norm_first=False`), no final norm, sinusoidal positions
  from 0 in Marian's sin|cos layout, embeddings times sqrt(d_model) when `scale_embedding`,
  shared and tied embeddings, `final_logits_bias`, decoder start = pad, LayerNorm eps 1e-5.
  `q/k/v/out_proj -> w_q/w_k/w_v/w_o`, `self_attn_layer_norm -> residual_1.norm`,
  `encoder_attn(_layer_norm) -> cross_attn / residual_2.norm`, `fc1/fc2 -> w_1/w_2`,
  `final_layer_norm -> last residual's norm`.
* GPT-2 (`GPT2LMHeadModel`): pre-LN with `ln_f`, learned positions, tied output, no
  embedding scale; Conv1D weights are [in, out] (transposed here) and `c_attn` is the fused
  [q | k | v] projection (split here).

Options we cannot express are refused with `UnsupportedCheckpoint`, naming the option.

Tokenizers. Our serving runs ONE SentencePiece model per checkpoint (`tokenizer.model`)
whose ids are the model's ids. GPT-2 (byte-level BPE) and Marian do not fit that: Marian
segments with `source.spm` / `target.spm` but numbers pieces with `vocab.json` (its own
joint vocabulary, not the SentencePiece ids). So an imported checkpoint gets no
`tokenizer.model` (a copied .spm would silently give wrong ids); instead the Hugging Face
tokenizer files are copied beside the weights, and `python -m export` refuses such a
checkpoint for want of a `tokenizer.model`. The contract a server would need for a Marian
checkpoint is what `MarianVocab` implements (here, not in the service): encode = source.spm
pieces -> vocab.json ids (missing -> unk) + eos (a leading `>>xx<<` language code is one
piece); decode = ids -> pieces through the inverted vocab.json (target_vocab.json when
present) -> target.spm `decode_pieces`, dropping eos and pad.

Export (ours -> Marian) writes a directory that `MarianMTModel.from_pretrained` and
`MarianTokenizer.from_pretrained` load with ids identical to ours (vocab.json = our pieces
-> our ids; source.spm = target.spm = our tokenizer.model). CTranslate2's Marian loader adds
two conventions of Marian's own: the decoder starts from a zero embedding (not from the
start token's row) and the last id is `<pad>` (dropped from the vocabulary and weights).
Its conversion is therefore exact only for checkpoints trained with
`decoder_start_id == pad_id == vocab_size - 1` (the pad row stays zero: padding_idx);
`export_marian(..., ctranslate2=True)` refuses other checkpoints, naming the option.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import sentencepiece as spm
import torch
import typer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from transformer.checkpoint import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    tokenizer_path,
)
from transformer.config import ConfigError, TransformerConfig
from transformer.model import EncoderDecoder, build_model, sinusoidal_table

# Hugging Face activation names -> ours. gelu_new / gelu_fast are the tanh approximation
# written out in Python; they equal torch's approximate="tanh" to float rounding.
HF_ACTIVATIONS: dict[str, str] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
# Ours -> the name written on export (all understood by transformers and CTranslate2).
EXPORT_ACTIVATIONS: dict[str, str] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "silu": "swish",
}
# Added to the logit of a token Hugging Face generation bans (Marian's bad_words_ids =
# [[pad]]), so our decoders never pick it either. Finite, so fp16 graphs stay NaN-free.
BANNED_LOGIT_BIAS = -1.0e4
# nn.LayerNorm's default, which Hugging Face Marian hard-codes.
MARIAN_LAYER_NORM_EPS = 1e-5

# MarianConfig's defaults, for keys a config.json leaves out.
_MARIAN_DEFAULTS: dict[str, Any] = {
    "vocab_size": 58101,
    "decoder_vocab_size": None,
    "max_position_embeddings": 1024,
    "encoder_layers": 12,
    "encoder_ffn_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_layers": 12,
    "decoder_ffn_dim": 4096,
    "decoder_attention_heads": 16,
    "activation_function": "gelu",
    "d_model": 1024,
    "dropout": 0.1,
    "decoder_start_token_id": 58100,
    "scale_embedding": False,
    "pad_token_id": 58100,
    "eos_token_id": 0,
    "share_encoder_decoder_embeddings": True,
    "tie_word_embeddings": True,
}
# Legacy Marian/BART switches (older config.json files) and the only value we can run.
_MARIAN_FIXED: dict[str, Any] = {
    "normalize_before": False,
    "add_final_layer_norm": False,
    "normalize_embedding": False,
    "add_bias_logits": False,
    "static_position_embeddings": True,
}
# GPT2Config's defaults, for keys a config.json leaves out.
_GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": None,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

SOURCE_SPM = "source.spm"
TARGET_SPM = "target.spm"
VOCAB = "vocab.json"
TARGET_VOCAB = "target_vocab.json"
MARIAN_TOKENIZER_FILES = (SOURCE_SPM, TARGET_SPM, VOCAB, TARGET_VOCAB, "tokenizer_config.json")
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")

StateDict = dict[str, Tensor]


class HuggingFaceCheckpointError(ValueError):
    """A Hugging Face directory we cannot read (missing file, tensor or wrong shape)."""


class UnsupportedCheckpoint(HuggingFaceCheckpointError):
    """A checkpoint option our Transformer cannot express; the message names the option."""


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HuggingFaceCheckpointError(f"{path} not found")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as error:  # not JSON, or not UTF-8: a file cut short or mistaken
        raise HuggingFaceCheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise HuggingFaceCheckpointError(f"{path} is not a JSON object")
    return data


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory."""
    return _read_json(Path(hf_dir) / CONFIG)


def read_hf_weights(hf_dir: str | Path) -> StateDict:
    """All tensors of a directory: model.safetensors, pytorch_model.bin, or their shards.

    `.bin` files are read with `torch.load(weights_only=True)`, which refuses pickled code.
    """
    path = Path(hf_dir)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        files: list[str] = []
        if index.is_file():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        elif (path / single).is_file():
            files = [single]
        if files:
            state: StateDict = {}
            for name in files:
                state.update(_read_weights_file(path / name))
            return state
    raise HuggingFaceCheckpointError(
        f"{path} has no model.safetensors, pytorch_model.bin or a sharded index of them"
    )


def _read_weights_file(path: Path) -> StateDict:
    """One weights file; one that cannot be read (cut short, not weights, pickled code)
    is a HuggingFaceCheckpointError naming it, not the reader's own exception."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's own text says to run it as code
        raise HuggingFaceCheckpointError(
            f"cannot read {path}: not tensors alone (weights_only=True refuses it)"
        ) from error
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        raise HuggingFaceCheckpointError(
            f"cannot read {path}: {str(error) or type(error).__name__}"
        ) from error
    if not isinstance(loaded, dict):
        raise HuggingFaceCheckpointError(f"{path} holds no state dict")
    return loaded


def _get(hf: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    return hf[key] if key in hf else defaults.get(key)


def _refuse(source: str, option: str, value: Any, why: str) -> UnsupportedCheckpoint:
    return UnsupportedCheckpoint(f"{source}: {option}={value!r} is not supported: {why}")


def _expect_model_type(hf: Mapping[str, Any], expected: str, source: str) -> None:
    if hf.get("model_type") != expected:
        raise _refuse(source, "model_type", hf.get("model_type"), f"expected {expected!r}")


def _activation(hf: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> str:
    name = _get(hf, defaults, "activation_function")
    if name not in HF_ACTIVATIONS:
        raise _refuse(source, "activation_function", name, f"ours are {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _single_id(hf: Mapping[str, Any], defaults: Mapping[str, Any], key: str, source: str) -> Any:
    value = _get(hf, defaults, key)
    if isinstance(value, list):
        if len(value) != 1:
            raise _refuse(source, key, value, "we stop on exactly one end-of-sequence id")
        value = value[0]
    return value


def _meta_state(config: TransformerConfig) -> dict[str, torch.Size]:
    """Names and shapes of our model's state dict, without allocating the weights."""
    with torch.device("meta"):
        model = build_model(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


class _Placer:
    """Moves Hugging Face tensors to our names, checking shapes and that none is left over.

    Why: a tensor we do not place means a feature we would silently drop (a layernorm of a
    pre-LN variant, an embedding LayerNorm, ...), so leftovers are refused by name.
    """

    def __init__(self, source: str, hf_state: Mapping[str, Tensor], config: TransformerConfig):
        self.source = source
        self.hf = hf_state
        self.expected = _meta_state(config)
        self.used: set[str] = set()
        self.out: StateDict = {}

    def take(self, hf_name: str) -> Tensor:
        if hf_name not in self.hf:
            raise HuggingFaceCheckpointError(f"{self.source}: tensor {hf_name!r} is missing")
        self.used.add(hf_name)
        tensor = self.hf[hf_name]
        return tensor.float() if tensor.is_floating_point() else tensor

    def put(self, name: str, tensor: Tensor) -> None:
        want = self.expected.get(name)
        if want is None:
            raise HuggingFaceCheckpointError(f"{self.source}: our model has no {name!r}")
        if tensor.shape != want:
            raise HuggingFaceCheckpointError(
                f"{self.source}: {name} has shape {list(tensor.shape)}, expected {list(want)}"
            )
        self.out[name] = tensor.contiguous()

    def finish(self, ignore: Iterable[str] = ()) -> StateDict:
        ignored = tuple(ignore)
        left = sorted(k for k in self.hf if k not in self.used and not any(s in k for s in ignored))
        if left:
            raise UnsupportedCheckpoint(
                f"{self.source}: {len(left)} tensor(s) we cannot place (an option we cannot "
                f"express?): {left[:6]}"
            )
        missing = sorted(set(self.expected) - set(self.out))
        if missing:
            raise HuggingFaceCheckpointError(f"{self.source}: nothing for {missing[:6]}")
        return self.out


# --------------------------------------------------------------------------- Marian


def _linear(ours: str, hf: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{hf}.weight"), (f"{ours}.bias", f"{hf}.bias")]


def _attention(ours: str, hf: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for mine, theirs in (
        ("w_q", "q_proj"),
        ("w_k", "k_proj"),
        ("w_v", "v_proj"),
        ("w_o", "out_proj"),
    ):
        pairs += _linear(f"{ours}.{mine}", f"{hf}.{theirs}")
    return pairs


def marian_layer_names(config: TransformerConfig) -> list[tuple[str, str]]:
    """(our name, Marian name without `model.`) for every per-layer tensor."""
    pairs: list[tuple[str, str]] = []
    for i in range(config.n_encoder_layers):
        o, h = f"encoder.layers.{i}", f"encoder.layers.{i}"
        pairs += _attention(f"{o}.self_attn", f"{h}.self_attn")
        pairs += _linear(f"{o}.residual_1.norm", f"{h}.self_attn_layer_norm")
        pairs += _linear(f"{o}.feed_forward.w_1", f"{h}.fc1")
        pairs += _linear(f"{o}.feed_forward.w_2", f"{h}.fc2")
        pairs += _linear(f"{o}.residual_2.norm", f"{h}.final_layer_norm")
    for i in range(config.n_decoder_layers):
        o, h = f"decoder.layers.{i}", f"decoder.layers.{i}"
        pairs += _attention(f"{o}.self_attn", f"{h}.self_attn")
        pairs += _linear(f"{o}.residual_1.norm", f"{h}.self_attn_layer_norm")
        pairs += _attention(f"{o}.cross_attn", f"{h}.encoder_attn")
        pairs += _linear(f"{o}.residual_2.norm", f"{h}.encoder_attn_layer_norm")
        pairs += _linear(f"{o}.feed_forward.w_1", f"{h}.fc1")
        pairs += _linear(f"{o}.feed_forward.w_2", f"{h}.fc2")
        pairs += _linear(f"{o}.residual_3.norm", f"{h}.final_layer_norm")
    return pairs


def marian_config(
    hf: Mapping[str, Any], unk_id: int = 1, source: str = "marian"
) -> TransformerConfig:
    """Our config for a Marian config.json, refusing what we cannot express."""
    d = _MARIAN_DEFAULTS
    _expect_model_type(hf, "marian", source)
    for key, value in _MARIAN_FIXED.items():
        if key in hf and hf[key] != value:
            raise _refuse(source, key, hf[key], f"only {value!r} (Marian's post-LN layout)")
    activation = _activation(hf, d, source)
    for ours, theirs in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if _get(hf, d, ours) != _get(hf, d, theirs):
            raise _refuse(
                source,
                theirs,
                _get(hf, d, theirs),
                f"must equal {ours}={_get(hf, d, ours)!r} (one value for both stacks)",
            )
    vocab = _get(hf, d, "vocab_size")
    decoder_vocab = _get(hf, d, "decoder_vocab_size") or vocab
    if decoder_vocab != vocab:
        raise _refuse(
            source,
            "decoder_vocab_size",
            decoder_vocab,
            f"our source and target share one vocabulary of vocab_size={vocab}",
        )
    pad = _single_id(hf, d, "pad_token_id", source)
    start = _single_id(hf, d, "decoder_start_token_id", source)
    eos = _single_id(hf, d, "eos_token_id", source)
    if pad is None:
        raise _refuse(source, "pad_token_id", pad, "Marian needs a pad id")
    return TransformerConfig(
        arch="encoder-decoder",
        vocab_size=vocab,
        d_model=_get(hf, d, "d_model"),
        n_heads=_get(hf, d, "encoder_attention_heads"),
        n_encoder_layers=_get(hf, d, "encoder_layers"),
        n_decoder_layers=_get(hf, d, "decoder_layers"),
        d_ff=_get(hf, d, "encoder_ffn_dim"),
        dropout=float(_get(hf, d, "dropout")),
        max_positions=_get(hf, d, "max_position_embeddings"),
        norm_first=False,
        final_norm=False,
        layer_norm_eps=MARIAN_LAYER_NORM_EPS,
        activation=activation,  # type: ignore[arg-type]
        positional="sinusoidal",
        scale_embeddings=bool(_get(hf, d, "scale_embedding")),
        share_embeddings=bool(_get(hf, d, "share_encoder_decoder_embeddings")),
        tie_output=bool(_get(hf, d, "tie_word_embeddings")),
        final_logits_bias=True,
        pad_id=pad,
        unk_id=unk_id,
        # Marian has no BOS; the decoder's start token (pad) is the nearest thing.
        bos_id=start if start is not None else pad,
        eos_id=eos,
        decoder_start_id=start if start is not None else pad,
    )


def _banned_tokens(hf_dir: Path, hf: Mapping[str, Any]) -> list[int]:
    """Single-token bad_words_ids of the generation config (Marian bans pad this way)."""
    gen_path = hf_dir / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    bad = gen.get("bad_words_ids", hf.get("bad_words_ids")) or []
    return sorted({seq[0] for seq in bad if isinstance(seq, list) and len(seq) == 1})


def _marian_unk_id(hf_dir: Path) -> int:
    """`<unk>`'s id in vocab.json (Marian's convention is 1)."""
    vocab_path = hf_dir / VOCAB
    if vocab_path.is_file():
        unk = (
            _read_json(hf_dir / "tokenizer_config.json").get("unk_token", "<unk>")
            if (hf_dir / "tokenizer_config.json").is_file()
            else "<unk>"
        )
        if isinstance(unk, dict):  # AddedToken serialised as a dict
            unk = unk.get("content", "<unk>")
        vocab = _read_json(vocab_path)
        if unk in vocab:
            return int(vocab[unk])
    return 1


def import_marian(
    hf_dir: str | Path, ban_bad_words: bool = True
) -> tuple[TransformerConfig, StateDict]:
    """Our config and state dict (loadable with strict=True) for a MarianMT directory.

    ban_bad_words: fold the generation config's single-token `bad_words_ids` (Marian bans
    pad) into final_logits_bias as BANNED_LOGIT_BIAS, so our decoders never produce them,
    as transformers' generate does not; the raw logits of those columns then differ.
    """
    path = Path(hf_dir)
    source = str(path)
    hf = read_hf_config(path)
    config = marian_config(hf, unk_id=_marian_unk_id(path), source=source)
    raw = read_hf_weights(path)
    # MarianMTModel's tensors live under `model.`; a bare MarianModel's do not.
    state = {k.removeprefix("model."): v for k, v in raw.items()}
    placer = _Placer(source, state, config)
    for ours, theirs in marian_layer_names(config):
        placer.put(ours, placer.take(theirs))

    def first_of(*names: str) -> Tensor:
        for name in names:
            if name in state:
                return placer.take(name)
        raise HuggingFaceCheckpointError(f"{source}: none of {list(names)} found")

    if config.share_embeddings:
        shared = first_of(
            "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"
        )
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in state and not torch.equal(placer.take(alias), shared):
                raise _refuse(
                    source,
                    "share_encoder_decoder_embeddings",
                    True,
                    f"{alias} differs from the shared embedding",
                )
        src_embed = tgt_embed = shared
    else:
        src_embed = first_of("encoder.embed_tokens.weight")
        tgt_embed = first_of("decoder.embed_tokens.weight")
        if "shared.weight" in state:
            placer.take("shared.weight")  # an unused copy of the encoder's table
    placer.put("src_embed.token.weight", src_embed)
    placer.put("tgt_embed.token.weight", tgt_embed)
    if config.tie_output:
        if "lm_head.weight" in state and not torch.equal(placer.take("lm_head.weight"), tgt_embed):
            raise _refuse(
                source,
                "tie_word_embeddings",
                True,
                "lm_head.weight differs from the decoder embedding",
            )
        placer.put("generator.proj.weight", tgt_embed)
    else:
        placer.put("generator.proj.weight", first_of("lm_head.weight"))
    if "final_logits_bias" in state:
        bias = placer.take("final_logits_bias").reshape(-1).clone()
    else:
        bias = torch.zeros(config.vocab_size)
    if ban_bad_words:
        for token in _banned_tokens(path, hf):
            if 0 <= token < config.vocab_size:
                bias[token] = BANNED_LOGIT_BIAS
    placer.put("generator.final_logits_bias", bias)

    table = sinusoidal_table(config.max_positions, config.d_model)
    for name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        if name in state:
            stored = placer.take(name)
            if stored.shape != table.shape or not torch.allclose(stored, table, atol=1e-4):
                raise _refuse(
                    source,
                    "embed_positions",
                    name,
                    "not Marian's sinusoidal table (sin | cos, from position 0)",
                )
    return config, placer.finish(ignore=("_float_tensor",))


# --------------------------------------------------------------------------- GPT-2


def gpt2_config(hf: Mapping[str, Any], source: str = "gpt2") -> TransformerConfig:
    """Our config for a GPT-2 config.json, refusing what we cannot express."""
    d = _GPT2_DEFAULTS
    _expect_model_type(hf, "gpt2", source)
    for key, value, why in (
        ("scale_attn_by_inverse_layer_idx", False, "we scale scores by 1/sqrt(d_head) only"),
        ("scale_attn_weights", True, "we always scale scores by 1/sqrt(d_head)"),
        ("add_cross_attention", False, "a decoder-only model has no cross-attention"),
    ):
        if _get(hf, d, key) != value:
            raise _refuse(source, key, _get(hf, d, key), why)
    # reorder_and_upcast_attn only computes attention in fp32: the same maths as ours.
    activation = _activation(hf, d, source)
    eos = _single_id(hf, d, "eos_token_id", source)
    bos = _single_id(hf, d, "bos_token_id", source)
    pad = _single_id(hf, d, "pad_token_id", source)
    if eos is None:
        raise _refuse(source, "eos_token_id", eos, "we need an end-of-text id")
    bos = eos if bos is None else bos
    d_model = _get(hf, d, "n_embd")
    return TransformerConfig(
        arch="decoder-only",
        vocab_size=_get(hf, d, "vocab_size"),
        d_model=d_model,
        n_heads=_get(hf, d, "n_head"),
        n_encoder_layers=0,
        n_decoder_layers=_get(hf, d, "n_layer"),
        d_ff=_get(hf, d, "n_inner") or 4 * d_model,
        dropout=float(_get(hf, d, "resid_pdrop")),
        max_positions=_get(hf, d, "n_positions"),
        norm_first=True,
        final_norm=True,
        layer_norm_eps=float(_get(hf, d, "layer_norm_epsilon")),
        activation=activation,  # type: ignore[arg-type]
        positional="learned",
        scale_embeddings=False,
        share_embeddings=True,
        tie_output=bool(_get(hf, d, "tie_word_embeddings")),
        final_logits_bias=False,
        # Byte-level BPE has no pad and no unk: <|endoftext|> stands in for both.
        pad_id=eos if pad is None else pad,
        unk_id=eos,
        bos_id=bos,
        eos_id=eos,
        decoder_start_id=bos,
    )


def import_gpt2(hf_dir: str | Path) -> tuple[TransformerConfig, StateDict]:
    """Our config and state dict (loadable with strict=True) for a GPT-2 directory."""
    path = Path(hf_dir)
    source = str(path)
    config = gpt2_config(read_hf_config(path), source)
    # GPT2LMHeadModel stores `transformer.*` (+ lm_head); the original GPT2Model files do not.
    state = {k.removeprefix("transformer."): v for k, v in read_hf_weights(path).items()}
    placer = _Placer(source, state, config)
    dm = config.d_model
    placer.put("embed.token.weight", placer.take("wte.weight"))
    placer.put("embed.position.weight", placer.take("wpe.weight"))
    for i in range(config.n_decoder_layers):
        h, o = f"h.{i}", f"decoder.layers.{i}"
        qkv_w = placer.take(f"{h}.attn.c_attn.weight")  # Conv1D: [D, 3D] = [in, out]
        qkv_b = placer.take(f"{h}.attn.c_attn.bias")  # [3D]
        for j, name in enumerate(("w_q", "w_k", "w_v")):
            placer.put(f"{o}.self_attn.{name}.weight", qkv_w[:, j * dm : (j + 1) * dm].t())
            placer.put(f"{o}.self_attn.{name}.bias", qkv_b[j * dm : (j + 1) * dm])
        for ours, theirs in (
            ("self_attn.w_o", "attn.c_proj"),
            ("feed_forward.w_1", "mlp.c_fc"),
            ("feed_forward.w_2", "mlp.c_proj"),
        ):
            placer.put(f"{o}.{ours}.weight", placer.take(f"{h}.{theirs}.weight").t())
            placer.put(f"{o}.{ours}.bias", placer.take(f"{h}.{theirs}.bias"))
        for ours, theirs in (("residual_1.norm", "ln_1"), ("residual_3.norm", "ln_2")):
            placer.put(f"{o}.{ours}.weight", placer.take(f"{h}.{theirs}.weight"))
            placer.put(f"{o}.{ours}.bias", placer.take(f"{h}.{theirs}.bias"))
    placer.put("decoder.norm.weight", placer.take("ln_f.weight"))
    placer.put("decoder.norm.bias", placer.take("ln_f.bias"))
    wte = placer.out["embed.token.weight"]
    if config.tie_output:
        if "lm_head.weight" in state and not torch.equal(placer.take("lm_head.weight"), wte):
            raise _refuse(source, "tie_word_embeddings", True, "lm_head.weight differs from wte")
        placer.put("generator.proj.weight", wte)
    else:
        placer.put("generator.proj.weight", placer.take("lm_head.weight"))
    # Old files carry the causal-mask buffers `h.N.attn.bias` / `masked_bias`.
    ignore = [f"h.{i}.attn.bias" for i in range(config.n_decoder_layers)]
    ignore += [f"h.{i}.attn.masked_bias" for i in range(config.n_decoder_layers)]
    for name in ignore:
        if name in state:
            placer.used.add(name)
    return config, placer.finish()


# --------------------------------------------------------------------------- saving


def detect_kind(hf_dir: str | Path) -> Literal["marian", "gpt2"]:
    model_type = read_hf_config(hf_dir).get("model_type")
    if model_type in ("marian", "gpt2"):
        return model_type  # type: ignore[return-value]
    raise _refuse(str(hf_dir), "model_type", model_type, "we import 'marian' and 'gpt2'")


def save_imported(
    hf_dir: str | Path,
    checkpoint_dir: str | Path,
    kind: Literal["auto", "marian", "gpt2"] = "auto",
) -> Path:
    """Import a Hugging Face directory and write it as our checkpoint.

    Writes model.safetensors + config.json (our format) and copies the Hugging Face
    tokenizer files found (Marian: source.spm, target.spm, vocab.json[, target_vocab.json];
    GPT-2: vocab.json, merges.txt). No tokenizer.model is written: see the module docstring.
    """
    src = Path(hf_dir)
    kind = detect_kind(src) if kind == "auto" else kind
    config, state = import_marian(src) if kind == "marian" else import_gpt2(src)
    model = build_model(config)
    model.load_state_dict(state, strict=True)
    # A tokenizer.model left by the checkpoint imported over would be exported and served
    # as this model's, numbering other pieces: none is better (the export then refuses).
    (Path(checkpoint_dir) / TOKENIZER).unlink(missing_ok=True)
    out = save_checkpoint(model.eval(), checkpoint_dir)
    for name in MARIAN_TOKENIZER_FILES if kind == "marian" else GPT2_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


class MarianVocab:
    """The tokenizer contract of an imported Marian checkpoint (see the module docstring).

    Why: the model's ids are vocab.json's, not the SentencePiece models' own ids, so serving
    must segment with SentencePiece and number with vocab.json; this is that, in full, with
    the translator half of service.tokenizer.Tokenizer's interface.
    """

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory)
        config = TransformerConfig.load(path / CONFIG)
        self.eos_id, self.unk_id, self.pad_id = config.eos_id, config.unk_id, config.pad_id
        self.source = spm.SentencePieceProcessor(model_file=str(path / SOURCE_SPM))
        self.target = spm.SentencePieceProcessor(model_file=str(path / TARGET_SPM))
        self.vocab: dict[str, int] = _read_json(path / VOCAB)
        target_vocab = path / TARGET_VOCAB
        inverse_of = _read_json(target_vocab) if target_vocab.is_file() else self.vocab
        self.inverse = {int(i): piece for piece, i in inverse_of.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.inverse)

    def encode_source(self, text: str) -> list[int]:
        """Source text -> ids ending with eos; a leading `>>xx<<` code is one piece."""
        pieces: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            pieces.append(text[: end + 2])
            text = text[end + 2 :]
        pieces += self.source.encode(text, out_type=str)
        return [self.vocab.get(p, self.unk_id) for p in pieces] + [self.eos_id]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.inverse.get(i, "<unk>") for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Target ids -> text, without eos and pad."""
        kept = [i for i in ids if i not in (self.eos_id, self.pad_id)]
        return str(self.target.decode_pieces(self.pieces(kept)))


# --------------------------------------------------------------------------- export


def _spm_pieces(path: Path) -> list[str]:
    processor = spm.SentencePieceProcessor(model_file=str(path))
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def marian_export_problems(config: TransformerConfig) -> list[str]:
    """Why our config has no Hugging Face Marian equivalent (empty: it has one)."""
    rules = [
        (config.arch == "encoder-decoder", f"arch={config.arch!r} (Marian is an encoder-decoder)"),
        (not config.norm_first, "norm_first=True (Marian is post-LN)"),
        (not config.final_norm, "final_norm=True (Marian has no final LayerNorm)"),
        (
            config.positional == "sinusoidal",
            f"positional={config.positional!r} (Marian is sinusoidal)",
        ),
        (config.share_embeddings, "share_embeddings=False (export needs one shared table)"),
        (config.tie_output, "tie_output=False (export needs a tied output projection)"),
        (
            math.isclose(config.layer_norm_eps, MARIAN_LAYER_NORM_EPS),
            f"layer_norm_eps={config.layer_norm_eps} (Marian's LayerNorm eps is 1e-5)",
        ),
    ]
    return [why for ok, why in rules if not ok]


def ctranslate2_problems(config: TransformerConfig, model: EncoderDecoder) -> list[str]:
    """Why CTranslate2's Marian converter would not reproduce our model (empty: it would).

    CTranslate2 starts the decoder from a zero embedding and drops the last id as `<pad>`.
    """
    problems = []
    if config.decoder_start_id != config.pad_id:
        problems.append(
            f"decoder_start_id={config.decoder_start_id} must equal pad_id={config.pad_id} "
            "(CTranslate2 starts the decoder from a zero embedding)"
        )
    if config.pad_id != config.vocab_size - 1:
        problems.append(
            f"pad_id={config.pad_id} must be vocab_size - 1 = {config.vocab_size - 1} "
            "(CTranslate2 drops the last id as Marian's <pad>)"
        )
    elif model.tgt_embed.token.weight[config.pad_id].abs().max() != 0:
        problems.append(f"the embedding row of pad_id={config.pad_id} must be zero")
    return problems


def export_marian(
    checkpoint_dir: str | Path, out_dir: str | Path, ctranslate2: bool = False
) -> Path:
    """Write our encoder-decoder checkpoint as a Hugging Face Marian directory.

    The ids stay ours (pad, eos, decoder start, every piece). ctranslate2=True also
    requires the conventions CTranslate2's Marian converter assumes (see
    `ctranslate2_problems`) and refuses otherwise, naming the option.
    """
    model = load_checkpoint(checkpoint_dir)
    config = model.config
    where = str(checkpoint_dir)
    problems = marian_export_problems(config)
    if not problems and isinstance(model, EncoderDecoder) and ctranslate2:
        problems = ctranslate2_problems(config, model)
    if problems:
        raise UnsupportedCheckpoint(f"{where}: cannot export as Marian: " + "; ".join(problems))
    assert isinstance(model, EncoderDecoder)
    spm_path = tokenizer_path(checkpoint_dir)
    pieces = _spm_pieces(spm_path)
    if len(pieces) != config.vocab_size:
        raise UnsupportedCheckpoint(
            f"{where}: vocab_size={config.vocab_size} but {TOKENIZER} has {len(pieces)} pieces; "
            "vocab.json needs one piece per id"
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {
        f"model.{theirs}": ours[mine].clone().contiguous()
        for mine, theirs in marian_layer_names(config)
    }
    tensors["model.shared.weight"] = ours["src_embed.token.weight"].clone().contiguous()
    bias = ours.get("generator.final_logits_bias", torch.zeros(config.vocab_size))
    tensors["final_logits_bias"] = bias.reshape(1, -1).clone().contiguous()
    table = sinusoidal_table(config.max_positions, config.d_model)
    tensors["model.encoder.embed_positions.weight"] = table.clone()
    tensors["model.decoder.embed_positions.weight"] = table.clone()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})

    ids = {
        "pad_token_id": config.pad_id,
        "eos_token_id": config.eos_id,
        "bos_token_id": config.bos_id,
        "decoder_start_token_id": config.decoder_start_id,
        # Ours does not force EOS at the length limit, so neither may generate().
        "forced_eos_token_id": None,
    }
    hf_config = {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "decoder_vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "encoder_layers": config.n_encoder_layers,
        "decoder_layers": config.n_decoder_layers,
        "encoder_attention_heads": config.n_heads,
        "decoder_attention_heads": config.n_heads,
        "encoder_ffn_dim": config.d_ff,
        "decoder_ffn_dim": config.d_ff,
        "activation_function": EXPORT_ACTIVATIONS[config.activation],
        "max_position_embeddings": config.max_positions,
        "scale_embedding": config.scale_embeddings,
        "share_encoder_decoder_embeddings": True,
        "tie_word_embeddings": True,
        "dropout": config.dropout,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "dtype": "float32",
        **ids,
    }
    _write_json(out / CONFIG, hf_config)
    _write_json(out / "generation_config.json", {**ids, "max_length": config.max_positions})
    shutil.copyfile(spm_path, out / SOURCE_SPM)
    shutil.copyfile(spm_path, out / TARGET_SPM)
    _write_json(out / VOCAB, {piece: i for i, piece in enumerate(pieces)})
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "MarianTokenizer",
            "source_lang": None,
            "target_lang": None,
            "unk_token": pieces[config.unk_id],
            "eos_token": pieces[config.eos_id],
            "pad_token": pieces[config.pad_id],
            "model_max_length": config.max_positions,
            "separate_vocabs": False,
        },
    )
    return out


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def _fail(error: Exception) -> typer.Exit:
    """One line naming the problem instead of a traceback."""
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(1)


_EXPECTED_ERRORS = (HuggingFaceCheckpointError, CheckpointError, ConfigError, FileNotFoundError)


@app.command("import-marian")
def import_marian_cli(
    hf_dir: Annotated[Path, typer.Argument(help="Local MarianMT directory.")],
    checkpoint_dir: Annotated[Path, typer.Argument(help="Where our checkpoint goes.")],
) -> None:
    """Import a local Hugging Face MarianMT directory as our checkpoint."""
    try:
        out = save_imported(hf_dir, checkpoint_dir, kind="marian")
    except _EXPECTED_ERRORS as error:
        raise _fail(error) from error
    typer.echo(f"wrote {out} (tokenizer: source.spm/target.spm + vocab.json, see MarianVocab)")


@app.command("import-gpt2")
def import_gpt2_cli(
    hf_dir: Annotated[Path, typer.Argument(help="Local GPT-2 directory.")],
    checkpoint_dir: Annotated[Path, typer.Argument(help="Where our checkpoint goes.")],
) -> None:
    """Import a local Hugging Face GPT-2 directory as our checkpoint."""
    try:
        out = save_imported(hf_dir, checkpoint_dir, kind="gpt2")
    except _EXPECTED_ERRORS as error:
        raise _fail(error) from error
    typer.echo(f"wrote {out} (tokenizer: GPT-2 byte-level BPE files, not SentencePiece)")


@app.command("to-marian")
def to_marian_cli(
    checkpoint_dir: Annotated[Path, typer.Argument(help="Our encoder-decoder checkpoint.")],
    out_dir: Annotated[Path, typer.Argument(help="Hugging Face Marian directory to write.")],
    ctranslate2: Annotated[
        bool, typer.Option(help="Refuse unless CTranslate2's converter would be exact.")
    ] = False,
) -> None:
    """Export our checkpoint as a Hugging Face Marian directory."""
    try:
        out = export_marian(checkpoint_dir, out_dir, ctranslate2=ctranslate2)
    except _EXPECTED_ERRORS as error:
        raise _fail(error) from error
    model = load_checkpoint(checkpoint_dir)
    if isinstance(model, EncoderDecoder) and (
        problems := ctranslate2_problems(model.config, model)
    ):
        typer.echo(
            "note: CTranslate2's Marian converter would not be exact: " + "; ".join(problems)
        )
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()

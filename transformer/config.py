"""One config dataclass for every model we build, save and export.

The same fields describe our own models and the Hugging Face checkpoints we import
(Marian: post-LN, sinusoidal positions, scaled shared embeddings, final logits bias;
GPT-2: pre-LN, learned positions, tied embeddings, GELU), so one code path serves all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

Architecture = Literal["encoder-decoder", "decoder-only"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Positional = Literal["sinusoidal", "learned"]

ARCHITECTURES: tuple[str, ...] = ("encoder-decoder", "decoder-only")
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu")
POSITIONALS: tuple[str, ...] = ("sinusoidal", "learned")


class ConfigError(ValueError):
    """A config that cannot build a model; the message names the field and the rule."""


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of a Transformer; saved with every checkpoint and ONNX file."""

    arch: Architecture = "encoder-decoder"
    vocab_size: int = 8000
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    max_positions: int = 512
    # Pre-LN (GPT-2, faster to train) or post-LN (the paper and Marian).
    norm_first: bool = True
    # A LayerNorm after the last layer of each stack (needed with pre-LN).
    final_norm: bool = True
    layer_norm_eps: float = 1e-5
    activation: Activation = "relu"
    positional: Positional = "sinusoidal"
    # Multiply token embeddings by sqrt(d_model), as the paper and Marian do.
    scale_embeddings: bool = True
    # Encoder and decoder use one embedding table (joint vocabulary).
    share_embeddings: bool = True
    # Output projection reuses the (decoder) embedding matrix.
    tie_output: bool = True
    # A learned bias added to the logits (Marian's final_logits_bias).
    final_logits_bias: bool = False
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    # First token fed to the decoder (Marian uses pad; we use bos).
    decoder_start_id: int = 2

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Fail early, naming the field and the rule it breaks."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            positive(name)
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}); "
                f"choose n_heads from the divisors of {self.d_model}"
            )
        if self.n_decoder_layers < 1:
            raise ConfigError(f"n_decoder_layers must be >= 1, got {self.n_decoder_layers}")
        if self.arch == "encoder-decoder" and self.n_encoder_layers < 1:
            raise ConfigError(
                f"n_encoder_layers must be >= 1 for an encoder-decoder, got {self.n_encoder_layers}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.positional not in POSITIONALS:
            raise ConfigError(f"positional must be one of {POSITIONALS}, got {self.positional!r}")
        if self.positional == "sinusoidal" and self.d_model % 2 != 0:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name in ("pad_id", "unk_id", "bos_id", "eos_id", "decoder_start_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """Build from parsed JSON, refusing unknown fields and values of the wrong JSON
        type by name (validate() compares numbers and would raise a bare TypeError)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config is a JSON object of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        hints = get_type_hints(cls)
        for name, value in data.items():
            expected = hints[name]
            if expected is bool:
                ok = isinstance(value, bool)
            elif expected is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif expected is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            else:  # a Literal of strings: validate() names the allowed values
                ok = isinstance(value, str)
            if not ok:
                raise ConfigError(f"{name} has the wrong type: got {value!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TransformerConfig:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"config is not valid JSON: {error}") from error
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TransformerConfig:
        """Read a config.json; a ConfigError names the file."""
        try:
            return cls.from_json(Path(path).read_text())
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error

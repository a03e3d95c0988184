"""The model repository's manifest: what a version folder holds and what its graphs expect.

The serving image has no torch, so this module imports only the standard library and
pydantic. It is the single place that spells out the I/O of the contract in export/README.md
(`graph_io`), so the exporter checks its graphs against it and the engine can rely on it.
`load_manifest` refuses a version folder whose files do not match their manifest, naming
the file and the mismatch.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# The API carries versions as uint64 (proto/inference/v1): a larger number could be loaded
# but not named in any answer (every call to it would fail INTERNAL).
MAX_VERSION = 2**64 - 1

Task = Literal["translation", "generation"]
Architecture = Literal["encoder-decoder", "decoder-only"]
Variant = Literal["fp32", "fp16", "int8"]
Graph = Literal["encoder", "decoder"]
Dim = int | str

VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8")
# The float dtype of activations, caches and logits per variant (int8: weights only).
FLOAT_DTYPE: dict[str, str] = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
TASK_OF_ARCH: dict[str, Task] = {"encoder-decoder": "translation", "decoder-only": "generation"}


class ManifestError(ValueError):
    """A version folder that does not match its manifest; the message names the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output: numpy dtype name and shape (ints fixed, names dynamic)."""

    name: str
    dtype: Literal["float32", "float16", "int64", "bool"]
    shape: list[Dim]


class GraphFile(_Strict):
    path: str  # relative to the version folder, POSIX separators
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return _check_relative(value)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        return _check_sha256(value)


class VariantFiles(_Strict):
    files: dict[Graph, GraphFile]


class TokenizerFile(_Strict):
    path: str
    sha256: str

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return _check_relative(value)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        return _check_sha256(value)


class Limits(_Strict):
    """Request limits. Translation: source tokens (incl. EOS) <= max_input_tokens, and
    new tokens <= max_new_tokens. Generation also needs prompt + new - 1 <= max_positions."""

    max_input_tokens: int = Field(gt=0)
    max_positions: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)


class SpecialIds(_Strict):
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    decoder_start_id: int


class CacheShape(_Strict):
    """The fixed dimensions of the KV cache [L, B, H, C, Dh]."""

    layers: int
    heads: int
    head_dim: int


class Manifest(_Strict):
    """manifest.json of models/<name>/<version>/."""

    format_version: int = FORMAT_VERSION
    name: str
    version: int = Field(ge=1, le=MAX_VERSION)
    task: Task
    architecture: Architecture
    source_language: str
    # Generation: the language of the continuation, i.e. the same as source_language.
    target_language: str
    config: dict[str, Any]
    limits: Limits
    special_ids: SpecialIds
    cache: CacheShape
    vocab_size: int
    opset: int
    variants: dict[Variant, VariantFiles]
    tokenizer: TokenizerFile
    created_at: datetime
    export_version: str
    # Library versions that produced the files (torch, onnx, onnxruntime, ...).
    tools: dict[str, str] = Field(default_factory=dict)
    # sha256 of the checkpoint files and export settings this version was built from.
    source: dict[str, str] = Field(default_factory=dict)

    def graph(self, variant: str, graph: str) -> GraphFile:
        """The file entry of one graph, with an error naming what is missing."""
        if variant not in self.variants:
            raise ManifestError(
                f"{self.name}/{self.version}: no variant {variant!r} (has {sorted(self.variants)})"
            )
        files = self.variants[variant].files  # type: ignore[index]
        if graph not in files:
            raise ManifestError(f"{self.name}/{self.version}/{variant}: no {graph!r} graph")
        return files[graph]  # type: ignore[index]

    def write(self, version_dir: str | Path) -> Path:
        path = Path(version_dir) / MANIFEST
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def _check_relative(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value or not value:
        raise ValueError(f"file paths must be relative to the version folder, got {value!r}")
    return value


def _check_sha256(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def required_graphs(task: str) -> tuple[Graph, ...]:
    return ("encoder", "decoder") if task == "translation" else ("decoder",)


def graph_io(
    task: str,
    graph: str,
    variant: str,
    layers: int,
    heads: int,
    head_dim: int,
    vocab_size: int,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The contract's inputs and outputs of one graph (export/README.md), in order.

    Dynamic axes are named B (rows), S (source), T (new tokens), C (cache capacity).
    """
    f = FLOAT_DTYPE[variant]
    cross: list[Dim] = [layers, "B", heads, "S", head_dim]

    def spec(name: str, dtype: str, shape: list[Dim]) -> TensorSpec:
        return TensorSpec(name=name, dtype=dtype, shape=shape)  # type: ignore[arg-type]

    if graph == "encoder":
        if task != "translation":
            raise ValueError("only translation models have an encoder graph")
        return (
            [spec("src_ids", "int64", ["B", "S"]), spec("src_mask", "bool", ["B", "S"])],
            [spec("cross_k", f, cross), spec("cross_v", f, cross)],
        )
    if graph != "decoder":
        raise ValueError(f"graph must be 'encoder' or 'decoder', got {graph!r}")
    # Per layer, so a caller holding [L, B, H, C, Dh] passes slices and the graph never
    # splits (copies) the stack.
    layer_cache: list[Dim] = ["B", heads, "C", head_dim]
    layer_cross: list[Dim] = ["B", heads, "S", head_dim]
    inputs = [spec("input_ids", "int64", ["B", "T"]), spec("positions", "int64", ["B"])]
    if task == "translation":
        inputs.append(spec("src_mask", "bool", ["B", "S"]))
    inputs += [spec(f"past_k_{i}", f, layer_cache) for i in range(layers)]
    inputs += [spec(f"past_v_{i}", f, layer_cache) for i in range(layers)]
    if task == "translation":
        inputs += [spec(f"cross_k_{i}", f, layer_cross) for i in range(layers)]
        inputs += [spec(f"cross_v_{i}", f, layer_cross) for i in range(layers)]
    new: list[Dim] = [layers, "B", heads, "T", head_dim]
    outputs = [
        spec("logits", f, ["B", "T", vocab_size]),
        spec("new_k", f, new),
        spec("new_v", f, new),
    ]
    if task == "translation":
        outputs.append(spec("cross_attention", f, ["B", "T", "S"]))
    return inputs, outputs


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(digest: str) -> str:
    return f"{digest[:12]}…"


def _verify_file(version_dir: Path, rel: str, expected: str) -> None:
    path = version_dir / rel
    if not path.is_file():
        raise ManifestError(f"{path}: listed in {MANIFEST} but missing")
    actual = file_sha256(path)
    if actual != expected:
        raise ManifestError(
            f"{path}: sha256 {_short(actual)} does not match manifest {_short(expected)}"
        )


def _check_consistency(manifest: Manifest, where: Path) -> None:
    """Fields that must agree with each other, so the engine can trust them."""
    expected_task = TASK_OF_ARCH[manifest.architecture]
    if manifest.task != expected_task:
        raise ManifestError(
            f"{where}: task {manifest.task!r} does not fit architecture "
            f"{manifest.architecture!r} (expected {expected_task!r})"
        )
    if not manifest.variants:
        raise ManifestError(f"{where}: lists no variants")
    # The engine admits requests by the limits: one past the positional table (the
    # config's) would fail inside the graph, at an out-of-bounds Gather mid-decode.
    limits, table = manifest.limits, manifest.config.get("max_positions")
    longest = max(limits.max_input_tokens, limits.max_new_tokens)
    if longest > limits.max_positions or (isinstance(table, int) and limits.max_positions > table):
        raise ManifestError(
            f"{where}: limits {limits} reach past the model's positions (config "
            f"max_positions {table}): re-export it (`make export`)"
        )
    needed = required_graphs(manifest.task)
    for variant, files in manifest.variants.items():
        missing = [g for g in needed if g not in files.files]
        extra = [g for g in files.files if g not in needed]
        if missing or extra:
            raise ManifestError(
                f"{where}: variant {variant} must have graphs {list(needed)}, "
                f"has {sorted(files.files)}"
            )
        for graph, entry in files.files.items():
            inputs, outputs = graph_io(
                manifest.task,
                graph,
                variant,
                manifest.cache.layers,
                manifest.cache.heads,
                manifest.cache.head_dim,
                manifest.vocab_size,
            )
            if entry.inputs != inputs or entry.outputs != outputs:
                raise ManifestError(
                    f"{where}: {entry.path} I/O in the manifest does not follow the contract "
                    f"(export/README.md) for a {manifest.task} {graph} in {variant}; "
                    "re-export it with this code (`make export`)"
                )


def load_manifest(
    version_dir: str | Path,
    variants: list[str] | None = None,
    verify_hashes: bool = True,
) -> Manifest:
    """Read and check models/<name>/<version>/manifest.json.

    Every listed file (of `variants`, default all, plus the tokenizer) must exist and
    match its sha256, and no unlisted .onnx file may lie in the folder. Raises
    ManifestError naming the file and the mismatch.
    """
    root = Path(version_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing (not a model version folder, or not exported)")
    try:
        # Bytes: a manifest that is not UTF-8 (corrupt, half-copied) is an invalid
        # manifest too, not a UnicodeDecodeError that escapes every caller's ManifestError.
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise ManifestError(f"{path}: invalid manifest: {error}") from error
    if manifest.format_version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest.format_version}, this code reads {FORMAT_VERSION}"
        )
    _check_consistency(manifest, path)
    if root.name.isdigit() and int(root.name) != manifest.version:
        raise ManifestError(f"{path}: version {manifest.version} but the folder is {root.name}")
    chosen = list(manifest.variants) if variants is None else variants
    for variant in chosen:
        if variant not in manifest.variants:
            raise ManifestError(f"{path}: no variant {variant!r} (has {sorted(manifest.variants)})")
    listed = {manifest.tokenizer.path} | {
        entry.path for files in manifest.variants.values() for entry in files.files.values()
    }
    for onnx_file in sorted(root.rglob("*.onnx")):
        rel = onnx_file.relative_to(root).as_posix()
        if rel not in listed:
            raise ManifestError(f"{onnx_file}: present but not listed in {MANIFEST}")
    if verify_hashes:
        _verify_file(root, manifest.tokenizer.path, manifest.tokenizer.sha256)
        for variant in chosen:
            for entry in manifest.variants[variant].files.values():  # type: ignore[index]
                _verify_file(root, entry.path, entry.sha256)
    return manifest


def version_dirs(model_dir: str | Path) -> list[int]:
    """The numbered versions under models/<name>/, ascending (other folders are ignored)."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and _is_version_name(p.name))


def _is_version_name(name: str) -> bool:
    """Whether a folder name is a version number as written: ASCII digits, no leading zero.
    str.isdigit() alone takes "²" (which int() refuses) and "٣", and "02", which the
    repository would look for as the folder "2"."""
    return name.isascii() and name.isdigit() and name == str(int(name))


__all__ = [
    "FLOAT_DTYPE",
    "MANIFEST",
    "MAX_VERSION",
    "VARIANTS",
    "CacheShape",
    "GraphFile",
    "Limits",
    "Manifest",
    "ManifestError",
    "SpecialIds",
    "TensorSpec",
    "TokenizerFile",
    "VariantFiles",
    "file_sha256",
    "graph_io",
    "load_manifest",
    "required_graphs",
    "version_dirs",
]

"""Checkpoint -> model repository version: ONNX graphs per variant, tokenizer, manifest.

Pipeline per graph (export/README.md is the contract):

* fp32: torch.onnx.export of the export.graphs wrapper, then onnxruntime's offline
  optimizations (ORT_ENABLE_EXTENDED on the CPU provider: LayerNorm/Gelu/MatMul fusions;
  every fused op it emits also has a CUDA kernel).
* int8: onnxruntime.quantization.quantize_dynamic of the fp32 export, its transposed
  weights folded first so every MatMul is quantized (int8 weights, activations quantized
  per call), then the same offline optimizations (which fuse DynamicQuantizeMatMul for
  the CPU).
* fp16: exported from a half-precision copy of the model, so the graph's float inputs and
  outputs (cache included) are float16 and no Cast sits at the cache; no offline
  optimization: a CPU session inserts float32 Casts around every op it has no fp16
  kernel for, and a model saved from it keeps them (the GPU would then compute in fp32).
  The GPU session does its own fusions at load.

The I/O of every file is checked against export.manifest.graph_io, the metadata
(config, tokenizer_sha256, variant, graph, export_version, model_name, model_version) is
written, and the manifest
records every file's sha256. A version is built in a hidden temporary folder and moved
into place when complete, so a half-written version never looks like one.

Languages come from, in order: explicit arguments (CLI options), an `export.json` in the
checkpoint folder or in the model folder above it ({"source_language": "en",
"target_language": "es", "limits": {"max_input_tokens": 256}}), or the model name
(`en-es` -> en to es for a translator; `en-lm` -> en for a language model).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict, Field

from export.graphs import (
    dynamic_axes,
    dynamic_shapes,
    example_inputs,
    graph_modules,
    io_names,
    task_of,
)
from export.manifest import (
    MANIFEST,
    VARIANTS,
    CacheShape,
    GraphFile,
    Limits,
    Manifest,
    ManifestError,
    SpecialIds,
    TensorSpec,
    TokenizerFile,
    VariantFiles,
    file_sha256,
    graph_io,
    load_manifest,
    version_dirs,
)
from transformer.checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_checkpoint
from transformer.config import TransformerConfig
from transformer.model import Model

log = logging.getLogger(__name__)

# Bumped when the graphs change (2: cache write as ScatterND; 3: the decoder returns the
# new keys and values only, the caller writes its cache; 4: per-layer cache inputs, fp16
# saved without CPU casts; 5: sinusoidal positions looked up with Gather, not GatherND;
# 6: int8 quantizes the tied output layer's MatMul too),
# so `make export` rebuilds versions made by older code.
EXPORT_VERSION = "6"
OPSET = 18
EXPORT_SETTINGS = "export.json"
# In a hidden build folder: the host and process building it (see _remove_stale).
BUILD_OWNER = ".owner.json"
Exporter = Literal["dynamo", "torchscript"]
DEFAULT_EXPORTER: Exporter = "dynamo"

_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


class ExportError(RuntimeError):
    """An export that cannot be done or produced a graph that breaks the contract."""


class ExportSettings(BaseModel):
    """export.json: what the checkpoint does not say about itself."""

    model_config = ConfigDict(extra="forbid")

    source_language: str | None = None
    target_language: str | None = None
    # Tighter request limits than the model's positions allow (None: the model's).
    limits: dict[str, int] = Field(default_factory=dict)


# --- one graph ------------------------------------------------------------------------------


def _export_graph(
    module: torch.nn.Module,
    config: TransformerConfig,
    graph: str,
    path: Path,
    variant: str,
    exporter: Exporter,
) -> None:
    """torch.onnx.export of one wrapper with the contract's names and dynamic axes, then
    shape inference (onnxruntime's fusions need intermediate shapes) and an I/O check."""
    module.eval()
    dtype = torch.float16 if variant == "fp16" else torch.float32
    inputs = example_inputs(config, graph, dtype)
    input_names, output_names = io_names(config, graph)
    # The dynamo exporter logs a warning per torchvision op it cannot register; we use none.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes(config, graph),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        else:
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes(config, graph),
                opset_version=OPSET,
                dynamo=False,
            )
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    conform_io(model, graph_io(
        task_of(config), graph, variant, config.n_decoder_layers, config.n_heads,
        config.head_dim, config.vocab_size,
    ))  # fmt: skip
    onnx.save(model, str(path))


def _value_spec(value: onnx.ValueInfoProto) -> tuple[str, str, list[int | str]]:
    tensor = value.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor.elem_type, f"onnx:{tensor.elem_type}")
    shape: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return value.name, dtype, shape


def conform_io(model: onnx.ModelProto, expected: tuple[list[TensorSpec], list[TensorSpec]]) -> None:
    """Check names, order and dtypes against the contract and write its shape names.

    Exporters name dynamic axes as they like (or not at all); the contract's names are set
    on the graph's inputs and outputs so every tool shows the same B, S, T, C.
    """
    for kind, values, specs in (
        ("inputs", model.graph.input, expected[0]),
        ("outputs", model.graph.output, expected[1]),
    ):
        got = [_value_spec(v) for v in values]
        want = [(s.name, s.dtype, s.shape) for s in specs]
        if [g[:2] for g in got] != [w[:2] for w in want]:
            raise ExportError(
                f"graph {kind} {[g[:2] for g in got]} != contract {[w[:2] for w in want]}"
            )
        for value, (name, _, shape), spec in zip(values, got, specs, strict=True):
            if len(shape) != len(spec.shape):
                raise ExportError(f"{name}: rank {len(shape)} != contract {spec.shape}")
            for dim, (have, want_dim) in enumerate(zip(shape, spec.shape, strict=True)):
                proto = value.type.tensor_type.shape.dim[dim]
                if isinstance(want_dim, int):
                    if isinstance(have, int) and have not in (0, want_dim):
                        raise ExportError(f"{name}: axis {dim} is {have}, contract says {want_dim}")
                    proto.dim_value = want_dim
                else:
                    if isinstance(have, int) and have != 0:
                        raise ExportError(f"{name}: axis {dim} fixed to {have}, must be dynamic")
                    proto.dim_param = want_dim


def _ort_optimize(src: Path, dst: Path, level: ort.GraphOptimizationLevel) -> None:
    """onnxruntime's offline graph optimization on the CPU provider."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def _fold_weight_transposes(src: Path, dst: Path) -> None:
    """Save `src` with every Transpose of an initializer replaced by the transposed
    initializer. The dynamo exporter folds no constant over 512 x 512 elements, so a tied
    output layer stays MatMul(x, Transpose(embedding)); quantize_dynamic quantizes only a
    MatMul whose B is an initializer, and left that one, the largest, in float behind a
    DequantizeLinear of its whole int8 weight at every call."""
    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights:
            array = onnx.numpy_helper.to_array(weights[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded = np.ascontiguousarray(array.transpose(perm))
            model.graph.initializer.append(onnx.numpy_helper.from_array(folded, node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {name for node in kept for name in node.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    onnx.save(model, str(dst))


def _quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic quantization: int8 weights of MatMul (every one: see
    _fold_weight_transposes) and of the tables a Gather looks up (token embeddings;
    sinusoidal positions since export version 5), float I/O."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded = dst.with_name(f"{dst.stem}.folded.onnx")
    _fold_weight_transposes(src, folded)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # silence its advice to run shape pre-processing
    try:
        quantize_dynamic(
            folded, dst, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True}
        )
    finally:
        root.setLevel(level)
        folded.unlink(missing_ok=True)


def _finish(
    path: Path,
    expected: tuple[list[TensorSpec], list[TensorSpec]],
    metadata: dict[str, str],
) -> None:
    """Conform the I/O, set metadata, check the model, save it in place."""
    model = onnx.load(str(path))
    conform_io(model, expected)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "transformer-serving export"
    model.producer_version = EXPORT_VERSION
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        raise ExportError(f"{path}: opset {opset} < 17")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# --- one checkpoint -------------------------------------------------------------------------


def read_settings(checkpoint_dir: Path) -> ExportSettings:
    """export.json from the checkpoint folder, else from the model folder above it."""
    for folder in (checkpoint_dir, checkpoint_dir.parent):
        path = folder / EXPORT_SETTINGS
        if path.is_file():
            try:
                return ExportSettings.model_validate_json(path.read_text())
            except ValueError as error:
                raise ExportError(f"{path}: {error}") from error
    return ExportSettings()


def _languages(
    task: str, name: str, settings: ExportSettings, source: str | None, target: str | None
) -> tuple[str, str]:
    source = source or settings.source_language
    target = target or settings.target_language
    parts = name.split("-")
    if source is None and len(parts) == 2 and re.fullmatch(r"[a-z]{2,3}", parts[0]):
        source = parts[0]
    if task == "generation":
        target = target or source
    elif (
        target is None
        and len(parts) == 2
        and parts[1] != "lm"  # <lang>-lm names a language model, not a target language
        and re.fullmatch(r"[a-z]{2,3}", parts[1])
    ):
        target = parts[1]
    if source is None or target is None:
        raise ExportError(
            f"cannot tell the languages of model {name!r}: name it <src>-<tgt> (translation) "
            f"or <lang>-lm (generation), write {EXPORT_SETTINGS} beside the checkpoint, or "
            "pass --source-language/--target-language"
        )
    return source, target


def _limits(config: TransformerConfig, settings: ExportSettings) -> Limits:
    base = {
        "max_input_tokens": config.max_positions,
        "max_positions": config.max_positions,
        "max_new_tokens": config.max_positions,
    }
    for key, value in settings.limits.items():
        if key not in base or key == "max_positions":
            raise ExportError(f"{EXPORT_SETTINGS}: unknown or fixed limit {key!r}")
        if not 0 < value <= base[key]:
            raise ExportError(f"{EXPORT_SETTINGS}: {key}={value} must be in [1, {base[key]}]")
        base[key] = value
    return Limits(**base)


# The fingerprint keys that say which model a version holds; the others say how it was built.
MODEL_KEYS = (CONFIG, WEIGHTS, TOKENIZER, EXPORT_SETTINGS, "name", "languages")


def fingerprint(
    checkpoint_dir: Path,
    variants: Sequence[str],
    exporter: Exporter,
    optimize: bool,
    name: str,
    languages: tuple[str, str],
) -> dict[str, str]:
    """What a version is built from: when it changes, the version is out of date.
    `languages`: the (source, target) the version gets (_resolved_languages)."""
    ckpt = Path(checkpoint_dir)
    result = {
        name: file_sha256(ckpt / name)
        for name in (CONFIG, WEIGHTS, TOKENIZER)
        if (ckpt / name).is_file()
    }
    for folder in (ckpt, ckpt.parent):
        if (folder / EXPORT_SETTINGS).is_file():
            result[EXPORT_SETTINGS] = file_sha256(folder / EXPORT_SETTINGS)
            break
    result["name"] = name
    result["languages"] = "->".join(languages)
    result["export_version"] = EXPORT_VERSION
    result["variants"] = ",".join(sorted(variants))
    result["exporter"] = exporter
    result["optimize"] = str(optimize)
    return result


def _tools(exporter: Exporter) -> dict[str, str]:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "exporter": f"torch.onnx {exporter}",
    }


def _half_copy(model: Model) -> Model:
    import copy

    return copy.deepcopy(model).half().eval()


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    variants: Iterable[str] = VARIANTS,
    *,
    name: str | None = None,
    version: int | None = None,
    source_language: str | None = None,
    target_language: str | None = None,
    exporter: Exporter = DEFAULT_EXPORTER,
    optimize: bool = True,
) -> Manifest:
    """Export a checkpoint folder into the version folder `out_dir` and return its manifest.

    name and version default to out_dir's parent name and out_dir's name (models/<name>/
    <version>/; version 1 if not numeric). out_dir is replaced as a whole. exporter
    "torchscript" is ~20x faster for tiny test models; "dynamo" gives cleaner graphs.
    """
    ckpt = Path(checkpoint_dir)
    out = Path(out_dir)
    chosen = list(dict.fromkeys(variants))
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise ExportError(f"variants must be a non-empty subset of {VARIANTS}, got {chosen}")
    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    name = out.resolve().parent.name if name is None else name
    check_name(name)
    if version is None:
        version = int(out.name) if out.name.isdigit() else 1
    _require_files(ckpt)
    threads = torch.get_num_threads()
    # Tracing computes little; on a busy machine more threads only spin (10x slower).
    torch.set_num_threads(1)
    try:
        return _export_checkpoint(
            ckpt, out, chosen, name, version, source_language, target_language, exporter,
            optimize,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _export_checkpoint(
    ckpt: Path,
    out: Path,
    chosen: list[str],
    name: str,
    version: int,
    source_language: str | None,
    target_language: str | None,
    exporter: Exporter,
    optimize: bool,
) -> Manifest:
    model = load_checkpoint(ckpt)
    config = model.config
    _check_tokenizer(ckpt, config)
    task = task_of(config)
    settings = read_settings(ckpt)
    source, target = _languages(task, name, settings, source_language, target_language)
    limits = _limits(config, settings)
    tokenizer_sha = file_sha256(ckpt / TOKENIZER)
    source_fp = fingerprint(ckpt, chosen, exporter, optimize, name, (source, target))

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    # Named before it exists, so that a SIGTERM while it is made still finds it to remove.
    work = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    try:
        _build_folder(work)
        raw = work / ".raw"
        raw.mkdir()
        for variant in chosen:
            (work / variant).mkdir()
        files: dict[str, dict[str, GraphFile]] = {v: {} for v in chosen}
        half = graph_modules(_half_copy(model)) if "fp16" in chosen else {}
        for graph, module in graph_modules(model).items():
            fp32_raw = raw / f"{graph}.fp32.onnx"
            if {"fp32", "int8"} & set(chosen):
                _export_graph(module, config, graph, fp32_raw, "fp32", exporter)
            for variant in chosen:
                rel = f"{variant}/{graph}.onnx"
                dst = work / rel
                if variant == "fp32":
                    src = fp32_raw
                elif variant == "int8":
                    src = raw / f"{graph}.int8.onnx"
                    _quantize_int8(fp32_raw, src)
                else:
                    src = raw / f"{graph}.fp16.onnx"
                    _export_graph(half[graph], config, graph, src, "fp16", exporter)
                if optimize and variant != "fp16":
                    _ort_optimize(src, dst, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
                else:
                    shutil.copyfile(src, dst)
                expected = graph_io(
                    task, graph, variant, config.n_decoder_layers, config.n_heads,
                    config.head_dim, config.vocab_size,
                )  # fmt: skip
                _finish(
                    dst,
                    expected,
                    {
                        "config": config.to_json(),
                        "tokenizer_sha256": tokenizer_sha,
                        "variant": variant,
                        "graph": graph,
                        "export_version": EXPORT_VERSION,
                        "model_name": name,
                        "model_version": str(version),
                    },
                )
                files[variant][graph] = GraphFile(
                    path=rel, sha256=file_sha256(dst), inputs=expected[0], outputs=expected[1]
                )
        variant_files = {v: VariantFiles(files=f) for v, f in files.items()}  # type: ignore[arg-type]
        shutil.rmtree(raw)
        shutil.copyfile(ckpt / TOKENIZER, work / TOKENIZER)
        manifest = Manifest(
            name=name,
            version=version,
            task=task,  # type: ignore[arg-type]
            architecture=config.arch,
            source_language=source,
            target_language=target,
            config=config.to_dict(),
            limits=limits,
            special_ids=SpecialIds(
                pad_id=config.pad_id,
                unk_id=config.unk_id,
                bos_id=config.bos_id,
                eos_id=config.eos_id,
                decoder_start_id=config.decoder_start_id,
            ),
            cache=CacheShape(
                layers=config.n_decoder_layers, heads=config.n_heads, head_dim=config.head_dim
            ),
            vocab_size=config.vocab_size,
            opset=OPSET,
            variants=variant_files,  # type: ignore[arg-type]
            tokenizer=TokenizerFile(path=TOKENIZER, sha256=tokenizer_sha),
            created_at=datetime.now(UTC),
            export_version=EXPORT_VERSION,
            tools=_tools(exporter),
            source=source_fp,
        )
        manifest.write(work)
        load_manifest(work)  # what the server will do: fail here rather than there
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _require_files(ckpt: Path) -> None:
    for required in (CONFIG, WEIGHTS, TOKENIZER):
        if not (ckpt / required).is_file():
            raise ExportError(f"checkpoint {ckpt} has no {required}")


def check_name(name: str) -> None:
    """A model name is the one folder models/<name>/ the server serves it from: a name
    that is empty, a path or hidden would be written where no server looks (or outside
    the repository) and still be reported as exported."""
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or len(name.encode()) > 255
    ):
        raise ExportError(
            f"model name {name!r} is not a folder name: use one plain name such as en-es "
            "(no path separators, not hidden, at most 255 bytes)"
        )


def _check_tokenizer(ckpt: Path, config: TransformerConfig) -> None:
    """The tokenizer must load and number exactly the model's ids: the server loads it
    only when it serves the version; an id past vocab_size fails every request, and an
    output id past the tokenizer's pieces fails the request that draws it (SentencePiece
    cannot decode it)."""
    import sentencepiece as spm

    path = ckpt / TOKENIZER
    try:
        pieces = int(spm.SentencePieceProcessor(model_file=str(path)).get_piece_size())
    except (OSError, RuntimeError) as error:
        raise ExportError(f"{path} is not a SentencePiece model: {error}") from error
    if pieces != config.vocab_size:
        raise ExportError(
            f"{path} has {pieces} pieces but {CONFIG} has vocab_size={config.vocab_size}: "
            "the tokenizer belongs to another model (the service decodes every id the "
            "model outputs with it)"
        )


def _resolved_languages(
    ckpt: Path, name: str, source: str | None = None, target: str | None = None
) -> tuple[str, str]:
    """The (source, target) languages a version of `name` exported from `ckpt` gets: the
    overrides, else export.json, else the name (ExportError when none tells)."""
    task = task_of(TransformerConfig.load(ckpt / CONFIG))
    return _languages(task, name, read_settings(ckpt), source, target)


def _build_folder(work: Path) -> None:
    """Make `work`, a new hidden folder beside the version to build it in, marked with this
    host and process so that a later export can tell one left by an export that died."""
    work.mkdir()  # not there before: a name taken already fails
    work.chmod(0o755)  # whatever the umask: the server may run as another user
    (work / BUILD_OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _remove_stale(out: Path) -> None:
    """Remove the hidden build and swap entries of `out` left by exports that died: those
    whose owner names this host and a process that is gone. A link is removed by its name
    alone, never what it points to."""
    host = socket.gethostname()
    for path in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        owner = _owner(path, host)
        if owner is None:
            continue  # not ours to judge: no owner, or one we cannot read
        if owner[0] != host or owner[1] == os.getpid():
            continue
        try:
            os.kill(owner[1], 0)
        except ProcessLookupError:
            log.info("removing %s, left by an export that did not finish", path)
            if path.is_symlink():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # another user's process is alive with that id


def _owner(path: Path, host: str) -> tuple[str | None, int] | None:
    """The host and process that left a hidden entry: a folder's owner file; for a link
    (a replaced version's, `.<N>.old-<pid>-<ns>`: _replace_dir) the pid in its name, taken
    as this host's, since an owner file read through it would be its target's."""
    try:
        if path.is_symlink():
            return host, int(path.name.rsplit("-", 2)[-2])
        owner = json.loads((path / BUILD_OWNER).read_text())
        pid = int(owner["pid"])  # first: a file that is no object fails here (TypeError)
        return owner.get("host"), pid
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); False where the C
    library, kernel or file system cannot, and nothing moved."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return bool(renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`. An older folder is swapped out in one step where the system
    can (a server reloading meanwhile finds one version or the other under the number,
    never none, which it would retire); else with two renames, and if the second fails
    the older one is put back. The owner file goes from the one to the other (what is
    published carries none; a replaced folder that cannot take it, read-only, is left for
    a person should this process die before removing it). A replaced link takes no owner
    file and goes as a link: what it points to is not the export's to write or delete."""
    owner = new / BUILD_OWNER
    mark = owner.read_text()
    owner.unlink()
    if target.is_dir() and not target.is_symlink() and _exchange(new, target):
        with contextlib.suppress(OSError):  # `new` now holds the replaced version
            (new / BUILD_OWNER).write_text(mark)
        shutil.rmtree(new, ignore_errors=True)
        return
    old, folder = None, False
    if os.path.lexists(target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        target.rename(old)
        folder = old.is_dir() and not old.is_symlink()  # a link: only the name is ours
        if folder:
            with contextlib.suppress(OSError):
                (old / BUILD_OWNER).write_text(mark)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        if folder:
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)  # a link goes, not what it points to


# --- a repository ---------------------------------------------------------------------------


def find_checkpoints(repository: Path, names: Sequence[str] = ()) -> dict[str, Path]:
    """models/<name>/checkpoint/ folders by model name (all, or those named)."""
    found = {
        p.parent.name: p for p in sorted(repository.glob("*/checkpoint")) if (p / CONFIG).is_file()
    }
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise ExportError(
                f"no checkpoint for {missing} under {repository} "
                f"(expected {repository}/<name>/checkpoint/{CONFIG}; found {sorted(found)})"
            )
        return {n: found[n] for n in names}
    return found


def export_model(
    checkpoint_dir: Path,
    version_dir: Path,
    variants: Sequence[str] = VARIANTS,
    force: bool = False,
    replace: bool = False,
    **kwargs: Any,
) -> tuple[Manifest, bool]:
    """export_checkpoint unless version_dir is already up to date; (manifest, rebuilt).

    A version number names one model: a folder built from another checkpoint, name or
    languages is not rewritten unless `replace` (a server that loaded it would go on
    serving the old one under the same number). One built from the same model by other
    code or options is rebuilt in place."""
    exporter = kwargs.get("exporter", DEFAULT_EXPORTER)
    optimize = kwargs.get("optimize", True)
    name = kwargs.get("name")
    name = Path(version_dir).resolve().parent.name if name is None else name
    check_name(name)
    ckpt = Path(checkpoint_dir)
    _require_files(ckpt)
    _remove_stale(Path(version_dir))
    _check_task_of_name(Path(version_dir), task_of(TransformerConfig.load(ckpt / CONFIG)))
    languages = _resolved_languages(
        ckpt, name, kwargs.get("source_language"), kwargs.get("target_language")
    )
    expected = fingerprint(ckpt, list(dict.fromkeys(variants)), exporter, optimize, name, languages)
    existing = _existing_source(Path(version_dir))
    if existing is not None:  # exported before the fingerprint had these: taken as asked
        existing = {key: expected[key] for key in ("name", "languages")} | existing
    if not force and existing == expected:
        with contextlib.suppress(ManifestError):  # same model, broken files: rebuilt
            return load_manifest(version_dir), False
    changed = [k for k in MODEL_KEYS if existing is not None and existing.get(k) != expected.get(k)]
    if changed and not replace:
        version = Path(version_dir).name
        raise ExportError(
            f"{version_dir} holds another model (changed: {', '.join(changed)}); a version "
            "number is published once: export it as a new version (--version "
            f"{int(version) + 1 if version.isdigit() else 'N+1'}), or pass --replace to "
            "rewrite this one"
        )
    return export_checkpoint(checkpoint_dir, version_dir, variants, **kwargs), True


def _manifest_json(version_dir: Path) -> dict[str, Any] | None:
    """A version folder's manifest as plain JSON, without checking its files or contract:
    which model a folder holds is still known when a file in it is damaged or it was
    built by older code (None: no manifest, or not a JSON object)."""
    try:
        data = json.loads((version_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing_source(version_dir: Path) -> dict[str, str] | None:
    """The fingerprint a version folder was built from (None: none there, or unreadable)."""
    data = _manifest_json(version_dir)
    if data is None:
        return None
    source = data.get("source", {})
    return {str(k): str(v) for k, v in source.items()} if isinstance(source, dict) else {}


def _check_task_of_name(version_dir: Path, task: str) -> None:
    """The versions of one name serve one task: the server routes a name by its newest
    version's task, so a language model published as en-es/2 would answer every
    translation request for en-es with NOT_FOUND."""
    model_dir = version_dir.parent
    for number in version_dirs(model_dir):
        other = model_dir / str(number)
        if other.name == version_dir.name:
            continue
        data = _manifest_json(other)
        if data is not None and data.get("task") not in (None, task):
            raise ExportError(
                f"the checkpoint is a {task} model but {other} holds a {data['task']} "
                f"model: the versions of {model_dir.name!r} serve one task; export it under "
                "another name"
            )


__all__ = [
    "DEFAULT_EXPORTER",
    "EXPORT_VERSION",
    "OPSET",
    "ExportError",
    "ExportSettings",
    "conform_io",
    "export_checkpoint",
    "export_model",
    "find_checkpoints",
    "fingerprint",
    "read_settings",
]

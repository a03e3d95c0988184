"""The manifest: a round trip through manifest.json, and every way a version folder can
disagree with it fails naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    file_sha256,
    load_manifest,
    version_dirs,
)


@pytest.fixture
def version_copy(exported, tmp_path: Path) -> Path:
    """A private copy of the exported translator (tests here tamper with it)."""
    e = exported("translator-post")
    target = tmp_path / "en-es" / "1"
    shutil.copytree(e.version_dir, target)
    return target


def test_round_trip(exported) -> None:
    e = exported("translator-post")
    loaded = load_manifest(e.version_dir)
    assert loaded == e.manifest
    assert Manifest.model_validate_json(loaded.model_dump_json()) == loaded
    assert (loaded.name, loaded.version, loaded.task) == ("en-es", 1, "translation")
    assert (loaded.source_language, loaded.target_language) == ("en", "es")
    assert loaded.architecture == "encoder-decoder"
    assert sorted(loaded.variants) == ["fp16", "fp32", "int8"]
    assert loaded.limits.max_positions == e.model.config.max_positions
    assert loaded.cache.layers == e.model.config.n_decoder_layers
    assert loaded.special_ids.eos_id == e.model.config.eos_id
    assert loaded.tokenizer.sha256 == file_sha256(e.checkpoint / "tokenizer.model")
    for files in loaded.variants.values():
        for entry in files.files.values():
            assert file_sha256(e.version_dir / entry.path) == entry.sha256
    lm = load_manifest(exported("lm-pre").version_dir)
    assert (lm.task, lm.source_language, lm.target_language) == ("generation", "en", "en")
    assert all(set(f.files) == {"decoder"} for f in lm.variants.values())


def test_changed_file_is_named(version_copy: Path) -> None:
    path = version_copy / "int8" / "decoder.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"int8/decoder\.onnx: sha256 \w+… does not match"):
        load_manifest(version_copy)
    # Only the variants asked for are hashed: the server loading fp32 is not blocked.
    assert load_manifest(version_copy, variants=["fp32"]).name == "en-es"


def test_missing_file_is_named(version_copy: Path) -> None:
    (version_copy / "fp16" / "encoder.onnx").unlink()
    with pytest.raises(
        ManifestError, match=r"fp16/encoder\.onnx: listed in manifest.json but missing"
    ):
        load_manifest(version_copy)


def test_changed_tokenizer_is_named(version_copy: Path) -> None:
    (version_copy / "tokenizer.model").write_bytes(b"not a tokenizer")
    with pytest.raises(ManifestError, match=r"tokenizer\.model: sha256"):
        load_manifest(version_copy, variants=["fp32"])


def test_wrong_hash_in_manifest_is_named(version_copy: Path) -> None:
    data = json.loads((version_copy / MANIFEST).read_text())
    data["variants"]["fp32"]["files"]["decoder"]["sha256"] = "0" * 64
    (version_copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(
        ManifestError, match=r"fp32/decoder\.onnx: sha256 .* manifest 000000000000…"
    ):
        load_manifest(version_copy)


def test_unlisted_onnx_file_is_named(version_copy: Path) -> None:
    shutil.copyfile(version_copy / "fp32" / "decoder.onnx", version_copy / "fp32" / "extra.onnx")
    with pytest.raises(ManifestError, match=r"fp32/extra\.onnx: present but not listed"):
        load_manifest(version_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(task="generation"), "does not fit architecture"),
        (lambda d: d["variants"]["fp32"]["files"].pop("encoder"), "must have graphs"),
        (lambda d: d["variants"]["fp32"]["files"]["decoder"]["inputs"].pop(), "contract"),
        # An export made before contract v3 (the decoder returned the whole cache).
        (
            lambda d: d["variants"]["fp32"]["files"]["decoder"]["outputs"][1].update(
                name="present_k"
            ),
            r"re-export it with this code \(`make export`\)",
        ),
        (lambda d: d["variants"]["fp32"]["files"]["decoder"].update(path="../x.onnx"), "relative"),
        (lambda d: d.update(surprise=1), "invalid manifest"),
        (lambda d: d.update(version=2), "the folder is 1"),
        # Limits past the positional table: the engine would admit requests the graph fails.
        (lambda d: d["limits"].update(max_positions=1024, max_new_tokens=1024), "positions"),
        (lambda d: d["limits"].update(max_new_tokens=1024), "positions"),
        # Past the API's uint64: served, it could not be named in an answer.
        (lambda d: d.update(version=2**64), "less than or equal to 18446744073709551615"),
    ],
)
def test_inconsistent_manifest_is_refused(version_copy: Path, edit, message: str) -> None:
    data = json.loads((version_copy / MANIFEST).read_text())
    edit(data)
    (version_copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_manifest(version_copy, verify_hashes=False)


def test_missing_manifest_and_unknown_variant(version_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.json: missing"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"no variant 'bf16'"):
        load_manifest(version_copy, variants=["bf16"])
    assert version_dirs(version_copy.parent) == [1]


def test_serving_modules_do_not_import_torch() -> None:
    """The serving image has no torch: the manifest and the ORT runner must not need it."""
    code = (
        "import sys, export.manifest, export.runtime, export.gpu_check; "
        "bad = [m for m in ('torch', 'transformer') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout

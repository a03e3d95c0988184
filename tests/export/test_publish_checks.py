"""What `python -m export` refuses before it publishes a version: a name that is no model
folder, a checkpoint of another task than the name's versions, a damaged or foreign
checkpoint; a damaged version folder still names the model it holds; and the parity
command refuses a variant it has no tolerance for before it runs. A version rebuilt in
place is never absent from its number."""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from export import onnx_export
from export.__main__ import app
from export.manifest import load_manifest
from export.parity import app as parity_app
from export.testing import make_tiny_checkpoint, tiny_tokenizer
from transformer.checkpoint import CONFIG, TOKENIZER, WEIGHTS

runner = CliRunner()
FAST = ["--variants", "fp32", "--exporter", "torchscript"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two translators (other weights) and a language model."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {
        "translator": ("encoder-decoder", 1),
        "other-translator": ("encoder-decoder", 2),
        "lm": ("decoder-only", 1),
    }
    for kind, (arch, seed) in made.items():
        make_tiny_checkpoint(root / kind, arch, seed=seed)
    return {kind: root / kind for kind in made}


def _export(repo: Path, checkpoint: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["--repository", str(repo), "--checkpoint", str(checkpoint), *FAST, *args]
    )
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("name", ["", "../outside", "a/en-es", ".hidden"])
def test_a_name_that_is_not_one_model_folder_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    languages = ["--source-language", "en", "--target-language", "es"]
    code, output = _export(repo, checkpoints["translator"], "--name", name, *languages)
    assert code == 1 and "is not a folder name" in output, output
    assert len(output.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [repo] and not list(repo.iterdir())


def test_a_missing_checkpoint_folder_is_named(tmp_path: Path) -> None:
    """Not taken for a checkpoint of the model named '' (its parent, the root)."""
    code, output = _export(tmp_path, Path("/nowhere"))
    assert code == 2 and "--checkpoint /nowhere is not a folder" in output, output
    assert not list(tmp_path.iterdir())


def test_a_version_past_what_the_api_carries_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Versions travel as uint64 (proto/inference/v1): a server loading en-es/2**64 would
    fail every call to it (and ListModels) with INTERNAL."""
    repo = tmp_path / "models"
    translator = checkpoints["translator"]
    code, output = _export(repo, translator, "--name", "en-es", "--version", str(2**64))
    assert code == 2 and "--version" in output and str(2**64 - 1) in output, output
    assert not (repo / "en-es").exists()
    largest = str(2**64 - 1)
    code, output = _export(repo, translator, "--name", "en-es", "--version", largest)
    assert code == 0, output
    assert load_manifest(repo / "en-es" / largest).version == 2**64 - 1


def test_a_version_of_another_task_is_not_published_under_a_name(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The server routes a name by its newest version's task: a language model published
    as en-es/2 would turn every translation request for en-es away."""
    repo = tmp_path / "models"
    assert _export(repo, checkpoints["translator"], "--name", "en-es")[0] == 0
    code, output = _export(repo, checkpoints["lm"], "--name", "en-es", "--version", "2")
    assert code == 1 and "serve one task" in output and "en-es/1" in output, output
    assert not (repo / "en-es" / "2").exists()
    # Nor is a translator taken for a language model because of its name.
    code, output = _export(repo, checkpoints["translator"], "--name", "xx-lm")
    assert code == 1 and "cannot tell the languages" in output, output
    # The same task under the name is published as usual.
    code, output = _export(
        repo, checkpoints["other-translator"], "--name", "en-es", "--version", "2"
    )
    assert code == 0, output


def test_a_damaged_version_still_names_the_model_it_holds(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A version whose files no longer match its manifest is not taken as empty: other
    weights are refused without --replace, the same model is rebuilt in place."""
    repo = tmp_path / "models"
    version = repo / "en-es" / "1"
    assert _export(repo, checkpoints["translator"], "--name", "en-es")[0] == 0
    with (version / TOKENIZER).open("ab") as f:
        f.write(b"damaged")
    code, output = _export(repo, checkpoints["other-translator"], "--name", "en-es")
    assert code == 1 and "holds another model" in output, output
    code, output = _export(repo, checkpoints["translator"], "--name", "en-es")
    assert code == 0 and "exported" in output, output
    assert load_manifest(version).source[WEIGHTS]


def _broken(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    """A copy of `checkpoint` broken in one way."""
    out = tmp_path / "en-es" / "checkpoint"
    shutil.copytree(checkpoint, out)
    if how == "config of another shape":
        config = json.loads((out / CONFIG).read_text())
        (out / CONFIG).write_text(json.dumps({**config, "d_ff": config["d_ff"] * 2}))
    elif how == "config not JSON":
        (out / CONFIG).write_text("{not json")
    elif how == "config field of the wrong type":
        config = json.loads((out / CONFIG).read_text())
        (out / CONFIG).write_text(json.dumps({**config, "dropout": "none"}))
    elif how == "weights truncated":
        (out / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes()[:100])
    elif how == "tokenizer not SentencePiece":
        (out / TOKENIZER).write_text("not a model")
    elif how == "tokenizer larger than the vocabulary":
        tiny_tokenizer(out / TOKENIZER, vocab_size=200, lines=[f"w{i} x{i}" for i in range(400)])
    elif how == "tokenizer smaller than the vocabulary":
        # The model can output ids the tokenizer has no piece for: the service's decode
        # of such an id raised IndexError and failed the request.
        tiny_tokenizer(out / TOKENIZER, vocab_size=40)
    return out


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("config of another shape", ["do not match config.json", "size mismatch"]),
        ("config not JSON", ["config.json", "not valid JSON"]),
        ("config field of the wrong type", ["dropout", "wrong type"]),
        ("weights truncated", ["cannot read", WEIGHTS]),
        ("tokenizer not SentencePiece", [TOKENIZER, "not a SentencePiece model"]),
        ("tokenizer larger than the vocabulary", [TOKENIZER, "vocab_size"]),
        ("tokenizer smaller than the vocabulary", [TOKENIZER, "vocab_size"]),
    ],
)
def test_a_broken_checkpoint_is_one_line_naming_what_is_wrong(
    checkpoints: dict[str, Path], tmp_path: Path, how: str, words: list[str]
) -> None:
    checkpoint = _broken(checkpoints["translator"], tmp_path, how)
    repo = tmp_path / "models"
    code, output = _export(repo, checkpoint, "--name", "en-es")
    assert code == 1 and output.startswith("en-es: ") and len(output.splitlines()) == 1, output
    for word in words:
        assert word in output, output
    assert not (repo / "en-es").exists() or not list((repo / "en-es").iterdir())


def test_parity_refuses_an_unknown_variant_before_running(tmp_path: Path) -> None:
    result = runner.invoke(
        parity_app, ["--repository", str(tmp_path), "--name", "en-es", "--variants", "fp8"]
    )
    assert result.exit_code == 2 and "fp8" in result.output, result.output
    assert not isinstance(result.exception, KeyError)


def test_parity_names_a_missing_or_damaged_version(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A version that is not there (or no longer matches its manifest) is a usage error
    naming the folder and the versions there are, not a ManifestError traceback."""
    repo = tmp_path / "models"
    shutil.copytree(checkpoints["translator"], repo / "en-es" / "checkpoint")
    assert runner.invoke(app, ["--repository", str(repo), *FAST]).exit_code == 0
    args = ["--repository", str(repo), "--data", str(tmp_path), "--out", str(tmp_path / "p.md")]
    wide = {"COLUMNS": "1000"}  # the error box keeps a path on one line
    result = runner.invoke(parity_app, [*args, "--version", "7"], env=wide)
    assert result.exit_code == 2, result.output
    assert "en-es/7/manifest.json: missing" in result.output and "[1]" in result.output
    with (repo / "en-es" / "1" / TOKENIZER).open("ab") as f:
        f.write(b"damaged")
    result = runner.invoke(parity_app, args, env=wide)
    assert result.exit_code == 2 and "tokenizer.model: sha256" in result.output, result.output
    assert not (tmp_path / "p.md").exists()


def test_parity_names_a_missing_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A version exported with --checkpoint from another folder has none beside it: parity
    was a FileNotFoundError traceback from hashing its files."""
    repo = tmp_path / "models"
    assert _export(repo, checkpoints["translator"], "--name", "en-es")[0] == 0
    args = ["--repository", str(repo), "--name", "en-es", "--data", str(tmp_path)]
    result = runner.invoke(parity_app, [*args, "--out", str(tmp_path / "p.md")])
    said = "".join(result.output.replace("│", "").split())  # rich wraps it mid-word
    assert result.exit_code == 2, result.output
    assert "en-es/checkpointhasnoconfig.json" in said, result.output
    assert not (tmp_path / "p.md").exists()


def _can_swap(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE) on two folders, twice (so they end as they were)."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, exchange = -100, 2
    swap = [at_cwd, bytes(a), at_cwd, bytes(b), exchange]
    return bool(renameat2(*swap) == 0 and renameat2(*swap) == 0)


def test_a_replaced_version_is_never_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding a version in place swaps the folders in one step: a server that reloads
    meanwhile finds the old or the new one under the number, never none (it would retire
    the version, and a name whose only version it was would answer NOT_FOUND)."""
    # Whether this system and file system can swap is asked here, not of _exchange (the
    # code under test): a broken _exchange must fail this test, not skip it.
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not _can_swap(probe_a, probe_b):
        pytest.skip("this system or file system cannot swap two folders in one step")
    (probe_a / "from-a").touch()
    assert onnx_export._exchange(probe_a, probe_b)
    assert (probe_b / "from-a").exists() and not (probe_a / "from-a").exists()
    target = tmp_path / "1"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    build = tmp_path / ".1.tmp-x"
    build.mkdir()
    (build / "manifest.json").write_text("new")
    (build / onnx_export.BUILD_OWNER).write_text(json.dumps({"host": "h", "pid": 1}))
    rename = Path.rename

    def watched(self: Path, to: Path) -> Path:
        moved = rename(self, to)
        assert target.is_dir(), f"{target} absent after {self} -> {to}"
        return moved

    monkeypatch.setattr(Path, "rename", watched)
    onnx_export._replace_dir(build, target)
    assert (target / "manifest.json").read_text() == "new"
    assert not (target / onnx_export.BUILD_OWNER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "a", "b"]

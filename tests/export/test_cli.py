"""The command lines: python -m export (skip when up to date), export.parity, gpu_check."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner

from export.__main__ import app as export_app
from export.gpu_check import app as gpu_app
from export.manifest import load_manifest
from export.onnx_export import BUILD_OWNER, ExportError, export_checkpoint
from export.parity import app as parity_app
from export.parity import check_model, render_report
from tests.fixtures import VERSES

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.mark.parametrize("app", [export_app, parity_app, gpu_app])
def test_help(app) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "--version" in result.output or "--version-dir" in result.output


def test_export_skips_when_up_to_date_and_force_rebuilds(exported, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(exported("lm-post").checkpoint, repo / "en-lm" / "checkpoint")
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    first = runner.invoke(export_app, args)
    assert first.exit_code == 0, first.output
    assert "exported" in first.output
    manifest = load_manifest(repo / "en-lm" / "1")
    assert (manifest.task, manifest.source_language) == ("generation", "en")
    second = runner.invoke(export_app, args)
    assert "up to date" in second.output
    assert load_manifest(repo / "en-lm" / "1").created_at == manifest.created_at
    forced = runner.invoke(export_app, [*args, "--force", "--version", "2"])
    assert forced.exit_code == 0 and "exported" in forced.output
    assert load_manifest(repo / "en-lm" / "2").version == 2
    # Other variants of the same model: version 1 is rebuilt in place.
    more = runner.invoke(export_app, [*args[:-4], "--variants", "fp32,int8", *args[-2:]])
    assert more.exit_code == 0 and "exported" in more.output
    assert sorted(load_manifest(repo / "en-lm" / "1").variants) == ["fp32", "int8"]
    # Another model (here: a changed export.json) is not written over version 1 ...
    (repo / "en-lm" / "export.json").write_text(json.dumps({"limits": {"max_new_tokens": 8}}))
    third = runner.invoke(export_app, args)
    assert third.exit_code == 1
    assert "holds another model (changed: export.json)" in third.output
    assert "--version 2" in third.output and "--replace" in third.output
    assert load_manifest(repo / "en-lm" / "1").limits.max_new_tokens != 8
    # ... unless asked to.
    replaced = runner.invoke(export_app, [*args, "--replace"])
    assert replaced.exit_code == 0 and "exported" in replaced.output
    assert load_manifest(repo / "en-lm" / "1").limits.max_new_tokens == 8
    assert not [p for p in (repo / "en-lm").iterdir() if p.name.startswith(".")]


def test_language_overrides_are_part_of_what_a_version_is_built_from(
    exported, tmp_path: Path
) -> None:
    """Asking for other languages is asking for another model, not an up-to-date one."""
    repo = tmp_path / "models"
    shutil.copytree(exported("translator-pre").checkpoint, repo / "en-es" / "checkpoint")
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    assert runner.invoke(export_app, args).exit_code == 0
    # Asking for the languages it gets anyway (from its name) is asking for the same model.
    explicit = [*args, "--source-language", "en", "--target-language", "es"]
    assert "up to date" in runner.invoke(export_app, explicit).output
    other = [*args, "--source-language", "fr", "--target-language", "de"]
    refused = runner.invoke(export_app, other)
    assert refused.exit_code == 1 and "changed: languages" in refused.output
    assert runner.invoke(export_app, [*other, "--replace"]).exit_code == 0
    manifest = load_manifest(repo / "en-es" / "1")
    assert (manifest.source_language, manifest.target_language) == ("fr", "de")
    assert "up to date" in runner.invoke(export_app, other).output
    # A version exported before the fingerprint had the name and languages is taken as
    # built with those asked for now: up to date, not refused as another model.
    manifest_file = repo / "en-es" / "1" / "manifest.json"
    written = json.loads(manifest_file.read_text())
    del written["source"]["name"], written["source"]["languages"]
    manifest_file.write_text(json.dumps(written))
    again = runner.invoke(export_app, other)
    assert again.exit_code == 0 and "up to date" in again.output


def test_export_errors_are_one_line_not_a_traceback(exported, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    checkpoint = repo / "en-lm" / "checkpoint"
    shutil.copytree(exported("lm-post").checkpoint, checkpoint)
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    (repo / "lm-xx").write_text("a file where the model folder goes")
    blocked = runner.invoke(export_app, [*args, "--checkpoint", str(checkpoint), "--name", "lm-xx"])
    assert blocked.exit_code == 1 and blocked.output.startswith("lm-xx: cannot export to")
    assert "Traceback" not in blocked.output and len(blocked.output.splitlines()) == 1
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "arch": "nope"}))
    bad = runner.invoke(export_app, args)
    assert bad.exit_code == 1 and bad.output.startswith("en-lm: ") and "arch" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.splitlines()) == 1


def _left_by(folder: Path, host: str, pid: int) -> Path:
    """A build folder as an export on `host` with process `pid` leaves it."""
    folder.mkdir()
    (folder / BUILD_OWNER).write_text(json.dumps({"host": host, "pid": pid}))
    return folder


def test_a_killed_export_leaves_nothing_behind(exported, tmp_path: Path) -> None:
    """SIGTERM unwinds the export (its build folder goes). A build folder left by an export
    of this host that died harder (SIGKILL) is removed by the next export of that version,
    even one that finds it up to date; what another host's export, a live process or a
    person left there is kept."""
    repo = tmp_path / "models"
    shutil.copytree(exported("lm-post").checkpoint, repo / "en-lm" / "checkpoint")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = _left_by(repo / "en-lm" / ".1.tmp-dead", host, dead.pid)
    kept = [
        _left_by(repo / "en-lm" / ".1.tmp-alive", host, os.getpid()),  # still exporting
        _left_by(repo / "en-lm" / ".1.tmp-elsewhere", host + "-other", dead.pid),
        repo / "en-lm" / ".1.tmp-by-hand",  # no owner file: not an export's
    ]
    kept[-1].mkdir()
    command = [sys.executable, "-m", "export", "--repository", str(repo), "--variants",
               "fp32,int8", "--exporter", "torchscript"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    ours = lambda: [p for p in (repo / "en-lm").glob(".1.tmp-*") if p != stale and p not in kept]  # noqa: E731
    while not ours():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr
        time.sleep(0.01)
    assert not stale.exists()
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in (repo / "en-lm").iterdir()) == sorted(
        ["checkpoint", *(p.name for p in kept)]
    )
    # Up to date: nothing to build, yet the leftovers of a dead export of this host go.
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    assert runner.invoke(export_app, args).exit_code == 0
    stale = _left_by(repo / "en-lm" / ".1.tmp-dead", host, dead.pid)
    again = runner.invoke(export_app, args)
    assert again.exit_code == 0 and "up to date" in again.output
    assert not stale.exists() and all(p.exists() for p in kept)
    published = repo / "en-lm" / "1"
    assert not (published / BUILD_OWNER).exists()


def test_a_signal_while_the_build_folder_is_made_leaves_nothing_behind(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (SystemExit) as the build folder is marked, right after it was made: the
    export unwinds and removes it. It was left behind when the signal came before the
    folder's name reached the code that cleans up (a make test run sent it there)."""
    from export import onnx_export

    out = tmp_path / "en-lm" / "1"
    out.parent.mkdir(parents=True)
    real = onnx_export.socket.gethostname

    def gethostname() -> str:
        if any(out.parent.glob(".1.tmp-*")):  # the folder exists, its owner file not yet
            raise SystemExit(128 + signal.SIGTERM)
        return real()

    monkeypatch.setattr(onnx_export.socket, "gethostname", gethostname)
    with pytest.raises(SystemExit):
        export_checkpoint(exported("lm-post").checkpoint, out, ["fp32"], exporter="torchscript")
    assert list(out.parent.iterdir()) == []


def test_a_replace_that_fails_halfway_puts_the_published_version_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build folder cannot take the version's place: the version it was to replace is
    back under its number (not left as a hidden folder). And a replaced folder that cannot
    take the owner file (read-only) does not stop the replace. (The two renames a system
    without an atomic swap uses.)"""
    from export import onnx_export

    monkeypatch.setattr(onnx_export, "_exchange", lambda a, b: False)
    target = tmp_path / "1"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    build = _left_by(tmp_path / ".1.tmp-x", socket.gethostname(), os.getpid())
    (build / "manifest.json").write_text("new")
    rename = Path.rename

    def failing_rename(self: Path, to: Path) -> Path:
        if self == build:
            raise OSError(28, "No space left on device")
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        onnx_export._replace_dir(build, target)
    assert (target / "manifest.json").read_text() == "old"
    assert not list(tmp_path.glob(".1.old-*"))
    monkeypatch.setattr(Path, "rename", rename)
    write_text = Path.write_text

    def read_only_old(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.parent.name.startswith(".1.old-"):
            raise PermissionError(13, "Permission denied")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only_old)
    (build / BUILD_OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    onnx_export._replace_dir(build, target)
    assert (target / "manifest.json").read_text() == "new"
    assert not (target / BUILD_OWNER).exists() and not list(tmp_path.glob(".1.*"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_replacing_a_linked_version_leaves_no_hidden_link_and_its_target_as_it_was(
    exported, tmp_path: Path
) -> None:
    """models/<name>/<N> may be a link to a folder elsewhere: --replace publishes the new
    export under N and removes the link by its name, writing nothing through it and
    deleting nothing it points to. A hidden link a dead export left is swept the same way
    (not judged by an owner file read through it)."""
    repo = tmp_path / "models"
    shutil.copytree(exported("lm-post").checkpoint, repo / "en-lm" / "checkpoint")
    store = tmp_path / "store"
    shutil.copytree(exported("lm-pre").version_dir, store / "en-lm-1")
    (repo / "en-lm" / "1").symlink_to(store / "en-lm-1", target_is_directory=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # what an export that died left: its owner file was written through the link
    _left_by(store / "replaced", socket.gethostname(), dead.pid)
    (repo / "en-lm" / f".1.old-{dead.pid}-1").symlink_to(store / "replaced")
    before = _tree(store)
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    refused = runner.invoke(export_app, args)
    assert refused.exit_code == 1 and "--replace" in refused.output
    result = runner.invoke(export_app, [*args, "--replace"])
    assert result.exit_code == 0 and "exported" in result.output, result.output
    assert sorted(p.name for p in (repo / "en-lm").iterdir()) == ["1", "checkpoint"]
    published = repo / "en-lm" / "1"
    assert published.is_dir() and not published.is_symlink()
    assert load_manifest(published).config == exported("lm-post").manifest.config
    assert not (published / BUILD_OWNER).exists()
    assert _tree(store) == before


def test_a_dangling_link_is_replaced_by_its_name(tmp_path: Path) -> None:
    """A version's link whose folder is gone is replaced like any other (not taken for
    nothing there, which the build folder cannot be renamed onto)."""
    from export import onnx_export

    target = tmp_path / "1"
    target.symlink_to(tmp_path / "gone", target_is_directory=True)
    build = _left_by(tmp_path / ".1.tmp-x", socket.gethostname(), os.getpid())
    (build / "manifest.json").write_text("new")
    onnx_export._replace_dir(build, target)
    assert not target.is_symlink() and (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_the_export_command_leaves_sigterm_as_it_found_it(exported, tmp_path: Path) -> None:
    """Its SIGTERM handler (unwind, removing the build folder) is for the export only: a
    program that runs it in process gets its own handler back."""
    repo = tmp_path / "models"
    shutil.copytree(exported("lm-post").checkpoint, repo / "en-lm" / "checkpoint")
    before = signal.getsignal(signal.SIGTERM)
    args = ["--repository", str(repo), "--variants", "fp32", "--exporter", "torchscript"]
    assert runner.invoke(export_app, args).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_export_unknown_name_fails_clearly(tmp_path: Path) -> None:
    result = runner.invoke(export_app, ["--repository", str(tmp_path), "--name", "xx-yy"])
    assert result.exit_code != 0
    assert "no checkpoint for ['xx-yy']" in result.output


def test_languages_from_export_json_or_failing(exported, tmp_path: Path) -> None:
    checkpoint = tmp_path / "bible" / "checkpoint"
    shutil.copytree(exported("lm-post").checkpoint, checkpoint)
    with pytest.raises(ExportError, match="cannot tell the languages"):
        export_checkpoint(checkpoint, tmp_path / "bible" / "1", ["fp32"], exporter="torchscript")
    assert not (tmp_path / "bible" / "1").exists()
    (checkpoint / "export.json").write_text(json.dumps({"source_language": "la"}))
    manifest = export_checkpoint(
        checkpoint, tmp_path / "bible" / "1", ["fp32"], exporter="torchscript"
    )
    assert (manifest.name, manifest.source_language, manifest.target_language) == (
        "bible",
        "la",
        "la",
    )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU is present"
)
def test_gpu_check_without_cuda_says_what_is_missing(exported) -> None:
    e = exported("translator-post")
    result = runner.invoke(gpu_app, ["--version-dir", str(e.version_dir)])
    assert result.exit_code == 2
    assert "CUDAExecutionProvider" in result.output and "onnxruntime-gpu" in result.output


@pytest.mark.parametrize("kind", ["translator-post", "lm-pre"])
def test_gpu_check_iobinding_path_on_cpu(exported, kind: str) -> None:
    """The double-buffered IOBinding loop, run on the CPU: same tokens as export.runtime."""
    e = exported(kind)
    result = runner.invoke(
        gpu_app,
        ["--version-dir", str(e.version_dir), "--device", "cpu", "--variants", "fp32,int8",
         "--verses", "6", "--batches", "2", "--steps", "2", "--max-new-tokens", "12"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| fp32 | 0.00e+00 | 6/6 |" in result.output


def test_parity_refuses_a_checkpoint_changed_since_the_export(exported, tmp_path: Path) -> None:
    """Stale exports are named as such, not reported as a parity failure."""
    e = exported("lm-post")
    version_dir = tmp_path / "en-lm" / "1"
    shutil.copytree(e.version_dir, version_dir)
    checkpoint = tmp_path / "en-lm" / "checkpoint"
    shutil.copytree(e.checkpoint, checkpoint)
    with (checkpoint / "model.safetensors").open("ab") as weights:
        weights.write(b" ")
    with pytest.raises(typer.BadParameter, match=r"model.safetensors changed .*re-export"):
        check_model(
            version_dir, checkpoint, tmp_path, verses=2, logit_verses=1, variants=None,
            batch_size=2, max_new_tokens=4, threads=1, log=False,
        )  # fmt: skip


def test_parity_report_on_fixture_verses(exported, tmp_path: Path) -> None:
    e = exported("translator-post")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(VERSES, data / "pairs.test.tsv")
    manifest, rows, baseline = check_model(
        e.version_dir, e.checkpoint, data, verses=12, logit_verses=4, variants=None,
        batch_size=8, max_new_tokens=16, threads=1, log=False,
    )  # fmt: skip
    by_variant = {r.variant: r for r in rows}
    assert by_variant["fp32"].greedy_identical == 12 and not by_variant["fp32"].failures
    assert by_variant["fp32"].logits_error is not None and by_variant["fp32"].logits_error < 1e-3
    assert by_variant["int8"].bleu is not None and "bleu" in baseline
    report = render_report([(manifest, rows, baseline)], "python -m export.parity")
    assert "| en-es | 1 | fp32 |" in report and "Machine:" in report

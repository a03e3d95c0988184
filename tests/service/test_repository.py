"""The model repository: scanning, versions, lookup errors, reload and draining."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from export.manifest import Manifest
from service.domain import ModelNotFound, Task, Unavailable, UnavailableReason
from service.repository import ModelRepository, ModelVersion
from tests.service._engine_models import LM, TRANSLATOR, copy_version, model_repository

pytestmark = pytest.mark.usefixtures("exported_models")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(model_repository(), out)
    (out / LM / "latest").mkdir()  # non-numeric folders are ignored
    (out / "notes").mkdir()
    return out


def rename_model(root: Path, src: str, dst: str) -> None:
    shutil.copytree(root / src, root / dst)
    path = root / dst / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["name"] = dst
    path.write_text(json.dumps(manifest))


def test_scan_loads_every_numbered_version(root: Path) -> None:
    repo = ModelRepository(root)
    result = repo.reload()
    assert sorted(e.key for e in result.loaded) == [f"{TRANSLATOR}:1", f"{LM}:1"]
    assert (result.retired, result.failed) == ([], {})
    assert repo.names() == [TRANSLATOR, LM]
    entry = repo.get(TRANSLATOR)
    assert (entry.version, entry.task, entry.manifest.name) == (1, Task.TRANSLATION, TRANSLATOR)
    assert repo.get("", task=Task.GENERATION).name == LM
    assert repo.reload().loaded == []  # nothing new


def test_latest_version_is_the_default_and_others_stay_reachable(root: Path) -> None:
    repo = ModelRepository(root)
    repo.reload()
    copy_version(root, LM, 1, 2)
    copy_version(root, LM, 1, 10)
    assert sorted(e.key for e in repo.reload().loaded) == [f"{LM}:10", f"{LM}:2"]
    assert repo.versions(LM) == [1, 2, 10]
    assert repo.get(LM).version == 10
    assert repo.get(LM, 2).version == 2
    assert repo.get(LM, 0).version == 10  # proto's 0 means latest

    # A version that is not usable yet (still warming up) does not take traffic.
    def warming(e: ModelVersion) -> UnavailableReason | None:
        return "loading" if e.version >= 10 else None

    assert repo.get(LM, unusable=warming).version == 2
    with pytest.raises(Unavailable, match="loading") as refused:
        repo.get(LM, 10, unusable=warming)
    assert refused.value.reason == "loading"

    # None usable: the refusal says why the newest is not.
    def failed(e: ModelVersion) -> UnavailableReason | None:
        return "engine_failed" if e.version == 10 else "draining"

    with pytest.raises(Unavailable, match=f"model {LM}:10 stopped: its engine failed") as refused:
        repo.get(LM, unusable=failed)
    assert refused.value.reason == "engine_failed"


def test_lookup_errors_list_what_is_loaded(root: Path) -> None:
    repo = ModelRepository(root)
    repo.reload()
    with pytest.raises(
        ModelNotFound, match=r"'fr-de' is not loaded.*en-es \(translation: versions 1\)"
    ):
        repo.get("fr-de", task=Task.TRANSLATION)
    with pytest.raises(ModelNotFound, match=r"has no version 3; loaded versions: 1"):
        repo.get(LM, 3)
    with pytest.raises(ModelNotFound, match=r"generation model, not translation.*en-es"):
        repo.get(LM, task=Task.TRANSLATION)
    empty = ModelRepository(root / "nowhere")
    empty.reload()
    with pytest.raises(ModelNotFound, match="no translation model is loaded"):
        empty.get("", task=Task.TRANSLATION)


def test_task_defaults(root: Path) -> None:
    rename_model(root, TRANSLATOR, "aa-bb")
    plain = ModelRepository(root)
    plain.reload()
    assert plain.default_name(Task.TRANSLATION) == "aa-bb"  # first by name
    preferred = ModelRepository(root, {Task.TRANSLATION: TRANSLATOR})
    preferred.reload()
    assert preferred.get("", task=Task.TRANSLATION).name == TRANSLATOR


def test_removed_version_retires_after_its_requests_finish(root: Path) -> None:
    repo = ModelRepository(root)
    repo.reload()
    copy_version(root, LM, 1, 2)
    repo.reload()
    old = repo.get(LM, 1)
    old.acquire()
    drained: list[ModelVersion] = []
    old.on_drained(drained.append)
    shutil.rmtree(root / LM / "1")
    result = repo.reload()
    assert [e.key for e in result.retired] == [f"{LM}:1"] and result.loaded == []
    assert old.retired and not old.drained and drained == []
    with pytest.raises(ModelNotFound, match="loaded versions: 2"):
        repo.get(LM, 1)
    with pytest.raises(Unavailable, match="retired"):
        old.acquire()
    old.release()
    assert old.drained and drained == [old]
    late: list[ModelVersion] = []
    old.on_drained(late.append)  # registering after the drain fires at once
    assert late == [old]
    with pytest.raises(RuntimeError):
        old.release()


def test_keep_versions_retires_older_ones(root: Path) -> None:
    copy_version(root, LM, 1, 2)
    repo = ModelRepository(root, keep_versions=1)
    repo.reload()
    assert repo.versions(LM) == [2]
    copy_version(root, LM, 1, 3)
    result = repo.reload()
    assert [e.key for e in result.loaded] == [f"{LM}:3"]
    assert [e.key for e in result.retired] == [f"{LM}:2"]


def test_broken_versions_are_reported_until_fixed_and_retried_when_changed(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = ModelRepository(root)
    repo.reload()
    bad = copy_version(root, TRANSLATOR, 1, 2)
    (bad / "fp32" / "decoder.onnx").write_bytes(b"not a model")
    result = repo.reload()
    assert result.loaded == []
    assert "decoder.onnx" in result.failed[str(bad)] and "sha256" in result.failed[str(bad)]
    # Not checked again until a file in it changes, but still reported.
    import service.repository as repository_module

    checked: list[Path] = []
    real = repository_module.load_manifest

    def load_manifest(path: Path, **kw: Any) -> Manifest:
        checked.append(path)
        return real(path, **kw)

    monkeypatch.setattr(repository_module, "load_manifest", load_manifest)
    again = repo.reload().failed[str(bad)]
    assert "sha256" in again and again.endswith("(no file in it changed since it failed)")
    assert bad not in checked
    assert repo.get(TRANSLATOR).version == 1
    # Fixed by replacing the broken file alone (the manifest untouched): tried again.
    good = root / TRANSLATOR / "1" / "fp32" / "decoder.onnx"
    shutil.copyfile(good, bad / "fp32" / "decoder.onnx")
    assert [e.key for e in repo.reload().loaded] == [f"{TRANSLATOR}:2"]
    assert bad in checked


def test_failures_of_folders_removed_from_disk_are_forgotten(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed folder, or a model folder that could not be listed, is remembered while it
    is on disk (to report it, and not to check it again unchanged), and no longer once it
    is gone: a server that lives through many failed deploys did keep each one."""
    import service.repository as repository_module

    repo = ModelRepository(root)
    repo.reload()
    for version in (2, 3):
        bad = copy_version(root, TRANSLATOR, 1, version)
        (bad / "fp32" / "decoder.onnx").write_bytes(b"not a model")
    assert len(repo.reload().failed) == 2
    shutil.rmtree(root / TRANSLATOR / "2")
    assert list(repo.reload().failed) == [str(root / TRANSLATOR / "3")]
    assert list(repo._failed) == [root / TRANSLATOR / "3"]
    shutil.rmtree(root / TRANSLATOR / "3")
    assert repo.reload().failed == {} and repo._failed == {}

    (root / "upload").mkdir()
    real = repository_module.version_dirs

    def version_dirs(model_dir: Path) -> list[int]:
        if model_dir.name == "upload":
            raise PermissionError(13, "Permission denied", str(model_dir))
        return real(model_dir)

    monkeypatch.setattr(repository_module, "version_dirs", version_dirs)
    repo.reload()
    assert list(repo._unreadable) == [root / "upload"]
    (root / "upload").rmdir()
    repo.reload()
    assert repo._unreadable == {}


def test_a_folder_the_server_could_not_read_is_retried_once_its_permissions_change(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version copied with files the server's user may not read fails (Permission
    denied); `chmod` fixes it without changing a file's size or modification time, which
    were all the failed-folder record compared: every reload then answered "no file in
    it changed since it failed" until a restart."""
    import service.repository as repository_module

    repo = ModelRepository(root)
    repo.reload()
    folder = copy_version(root, TRANSLATOR, 1, 2)
    tokenizer = next(folder.glob("*.model"))
    tokenizer.chmod(0o600)  # owned by another user than the server's, say
    real = repository_module.load_manifest

    def load_manifest(path: Path, **kw: Any) -> Any:
        if tokenizer.stat().st_mode & 0o004 == 0:  # what the server's user meets
            raise PermissionError(13, "Permission denied", str(tokenizer))
        return real(path, **kw)

    monkeypatch.setattr(repository_module, "load_manifest", load_manifest)
    assert "Permission denied" in repo.reload().failed[str(folder)]
    time.sleep(0.05)  # past the file system's timestamp granularity
    tokenizer.chmod(0o644)
    result = repo.reload()
    assert [e.key for e in result.loaded] == [f"{TRANSLATOR}:2"] and result.failed == {}


def test_only_the_served_variant_is_hash_checked(root: Path) -> None:
    (root / TRANSLATOR / "1" / "fp32" / "encoder.onnx").write_bytes(b"corrupt")
    assert [e.key for e in ModelRepository(root, variants=["int8", "fp32"]).reload().loaded] == [
        f"{TRANSLATOR}:1",
        f"{LM}:1",
    ]
    result = ModelRepository(root, variants=["fp32"]).reload()
    assert [e.key for e in result.loaded] == [f"{LM}:1"]
    assert "encoder.onnx" in next(iter(result.failed.values()))


def test_discard_drops_a_version_that_cannot_serve(root: Path) -> None:
    repo = ModelRepository(root)
    repo.reload()
    entry = repo.get(LM)
    repo.discard(entry, "engine failed")
    assert entry.retired and repo.names() == [TRANSLATOR]
    # Not by a second scan of the reload that tried it, but by the next reload: what
    # failed its engine (memory, a device) may have been fixed outside its folder.
    tried = {str(entry.path)}
    assert repo.load_new(tried).failed == {str(entry.path): "engine failed"}
    assert [e.key for e in repo.reload().loaded] == [f"{LM}:1"]
    assert repo.names() == [TRANSLATOR, LM]


def test_a_folder_that_could_not_be_read_is_tried_again_by_every_reload(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError while checking a version (EMFILE while the server held many
    connections, EIO from a flaky mount) says nothing of its files: every reload checks it
    again, though none of them changed. Before, it failed with "no file in it changed
    since it failed" until a restart."""
    import service.repository as repository_module

    repo = ModelRepository(root)
    repo.reload()
    folder = copy_version(root, TRANSLATOR, 1, 2)
    failing = [True]
    real = repository_module.load_manifest

    def load_manifest(path: Path, **kw: Any) -> Any:
        if failing[0]:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, **kw)

    monkeypatch.setattr(repository_module, "load_manifest", load_manifest)
    assert repo.reload().failed == {str(folder): "[Errno 24] Too many open files"}
    failing[0] = False
    result = repo.reload()
    assert [e.key for e in result.loaded] == [f"{TRANSLATOR}:2"] and result.failed == {}


def test_removing_the_newest_version_serves_the_one_before(root: Path) -> None:
    """keep_versions=1, version 2 serving: removing its folder (a rollback) loads version 1
    and retires version 2 alone, not the version just loaded to replace it."""
    copy_version(root, LM, 1, 2)
    repo = ModelRepository(root, keep_versions=1)
    repo.reload()
    shutil.rmtree(root / LM / "2")
    result = repo.reload()
    assert [e.key for e in result.loaded] == [f"{LM}:1"]
    assert [e.key for e in result.retired] == [f"{LM}:2"]
    assert repo.versions(LM) == [1] and repo.get(LM).version == 1


def test_lookups_do_not_wait_for_a_new_version_being_checked(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_new runs in a worker thread while every call looks up its model on the event
    loop: hashing a new version's files (seconds for a large model) must not hold the
    lock those lookups take."""
    import service.repository as repository_module

    repo = ModelRepository(root)
    repo.reload()
    copy_version(root, LM, 1, 2)
    checking, release = threading.Event(), threading.Event()
    real = repository_module.load_manifest

    def slow(path: Path, **kw: Any) -> Any:
        checking.set()
        release.wait(30)
        return real(path, **kw)

    monkeypatch.setattr(repository_module, "load_manifest", slow)
    loader = threading.Thread(target=repo.load_new)
    loader.start()
    try:
        assert checking.wait(30)
        found: list[int] = []
        lookup = threading.Thread(target=lambda: found.append(repo.get(LM).version))
        lookup.start()
        lookup.join(5)
        assert found == [1], "the lookup waited for the version being checked"
    finally:
        release.set()
        loader.join(30)
    assert repo.versions(LM) == [1, 2]


def test_keep_versions_falls_back_past_a_broken_newest_version(root: Path) -> None:
    """Only the newest version is loaded, unless it does not load: then the one before."""
    copy_version(root, LM, 1, 2)
    broken = copy_version(root, LM, 1, 3)
    (broken / "tokenizer.model").unlink()
    repo = ModelRepository(root, keep_versions=1)
    result = repo.reload()
    assert str(broken) in result.failed
    assert repo.versions(LM) == [2] and repo.versions(TRANSLATOR) == [1]


def test_keep_versions_loads_only_the_newest_at_first_scan(root: Path) -> None:
    """With keep_versions=1 and versions 1 and 2 on disk, the first scan loads version 2
    alone: version 1 is never loaded (nor loaded and retired at once)."""
    copy_version(root, LM, 1, 2)
    repo = ModelRepository(root, keep_versions=1)
    result = repo.reload()
    assert sorted(e.key for e in result.loaded) == [f"{TRANSLATOR}:1", f"{LM}:2"]
    assert result.retired == [] and result.failed == {}
    assert repo.versions(LM) == [2]


def test_a_manifest_naming_another_model_is_not_loaded(root: Path) -> None:
    """other/1 holding en-es's manifest is reported (naming both) and not served as
    "other" (nor as en-es)."""
    shutil.copytree(root / TRANSLATOR / "1", root / "other" / "1")
    repo = ModelRepository(root)
    result = repo.reload()
    folder = str(root / "other" / "1")
    assert list(result.failed) == [folder]
    assert f"names model '{TRANSLATOR}', the folder is 'other'" in result.failed[folder]
    assert sorted(e.key for e in result.loaded) == [f"{TRANSLATOR}:1", f"{LM}:1"]
    assert repo.names() == [TRANSLATOR, LM]
    assert "other" in (repo.names_on_disk() or set())


@pytest.mark.parametrize("held", [False, True])
def test_a_failing_drain_hook_does_not_stop_the_others(
    root: Path, held: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain hook that raises is logged; the hooks after it still run, and neither
    retire() nor the last release() raises."""
    repo = ModelRepository(root)
    repo.reload()
    entry = repo.get(LM)
    if held:
        entry.acquire()
    called: list[str] = []

    def failing(version: ModelVersion) -> None:
        called.append("failing")
        raise RuntimeError("hook broke")

    entry.on_drained(failing)
    entry.on_drained(lambda version: called.append(version.key))
    entry.retire()
    if held:
        assert called == []  # still in flight
        entry.release()
    assert called == ["failing", f"{LM}:1"]
    assert entry.drained
    assert f"drain hook of {LM}:1 failed" in caplog.text


def test_folders_not_named_as_a_version_number_are_ignored(tmp_path: Path) -> None:
    """Names str.isdigit() takes but that spell no version ("²", "٣", "02") are ignored,
    like `checkpoint/`: "²" failed every scan (the server's start, each reload) with
    int()'s ValueError, and "02" was looked for as the folder "2"."""
    for name in ("²", "٣", "02"):
        (tmp_path / TRANSLATOR / name).mkdir(parents=True)
    result = ModelRepository(tmp_path).reload()
    assert (result.loaded, result.failed) == ([], {})


def test_a_manifest_that_is_not_utf8_fails_its_folder_alone(root: Path) -> None:
    """A corrupt manifest.json (bytes that are not UTF-8) raised UnicodeDecodeError out of
    the scan: the server did not start, and every reload failed (INTERNAL), so no other
    model's new version loaded either."""
    repo = ModelRepository(root)
    repo.reload()
    bad = copy_version(root, TRANSLATOR, 1, 2)
    (bad / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    copy_version(root, LM, 1, 2)
    result = repo.reload()
    assert [e.key for e in result.loaded] == [f"{LM}:2"]
    assert list(result.failed) == [str(bad)] and "invalid manifest" in result.failed[str(bad)]
    assert repo.get(TRANSLATOR).version == 1
    assert ModelRepository(root).reload().failed.keys() == {str(bad)}  # a start, too


def test_a_model_folder_that_cannot_be_listed_is_skipped_and_keeps_its_versions(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A model folder the server may not list (`lost+found` of a volume, 0700 and owned by
    root, when the server runs as another user; an upload in progress by another user)
    raised PermissionError out of every scan: the server did not start, nor did any reload
    run. It is skipped, with one warning; and a loaded model whose folder cannot be
    listed for a while is not retired (what is on disk is unknown)."""
    import service.repository as repository_module

    (root / "lost+found" / "1").mkdir(parents=True)
    locked = {root / "lost+found"}
    real = repository_module.version_dirs

    def version_dirs(model_dir: Path) -> list[int]:
        if model_dir in locked:
            raise PermissionError(13, "Permission denied", str(model_dir))
        return real(model_dir)

    monkeypatch.setattr(repository_module, "version_dirs", version_dirs)
    caplog.set_level(logging.WARNING, logger="service.repository")  # whatever ran before
    repo = ModelRepository(root)
    assert repo.names_on_disk() == {TRANSLATOR, LM} and repo.unlisted() == {"lost+found"}
    result = repo.reload()
    assert sorted(e.key for e in result.loaded) == [f"{TRANSLATOR}:1", f"{LM}:1"]
    assert result.failed == {}
    locked.add(root / LM)
    copy_version(root, TRANSLATOR, 1, 2)
    result = repo.reload()
    assert [e.key for e in result.loaded] == [f"{TRANSLATOR}:2"] and result.retired == []
    assert repo.get(LM).version == 1
    assert caplog.text.count("lost+found: cannot list it (Permission denied)") == 1


def test_a_repository_that_cannot_be_listed_retires_nothing(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload while the repository itself was gone (a volume unmounted, the folder moved
    away for a moment) found no model on disk and retired every one: the server served
    nothing (NOT_FOUND to every call) until the next reload warmed them all again. What
    it holds is unknown then, as for a model folder that cannot be listed."""
    repo = ModelRepository(root)
    repo.reload()
    away = root.with_name("away")
    root.rename(away)
    caplog.set_level(logging.WARNING, logger="service.repository")
    result = repo.reload()
    assert result.loaded == [] and result.retired == []
    assert "cannot list the model repository" in result.failed[str(root)]
    assert repo.get(TRANSLATOR).version == 1 and repo.get(LM).version == 1
    assert "nothing loaded or retired until it can be" in caplog.text
    assert repo.names_on_disk() is None and repo.unlisted() is None  # not "none on disk"
    away.rename(root)
    assert repo.reload().loaded == [] and repo.reload().failed == {}
    assert repo.names_on_disk() == {TRANSLATOR, LM} and repo.unlisted() == set()
    assert repo.names() == [TRANSLATOR, LM]


def test_versions_a_failed_scan_had_added_are_taken_back(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_new() lists each version as it checks it. A scan that failed half-way (the
    non-UTF-8 manifest above did) left those it had listed: their caller (the scheduler's
    reload) never started them, the next scan took them as present, so they stayed
    "loading" for good, and the next prune() retired the versions they replace: the model
    served nothing until a restart."""
    repo = ModelRepository(root, keep_versions=1)
    repo.reload()
    copy_version(root, TRANSLATOR, 1, 2)
    copy_version(root, LM, 1, 2)
    real = repo._load

    def load(name: str, *args: Any) -> ModelVersion | None:
        if name == LM:  # scanned after TRANSLATOR
            raise RuntimeError("the scan failed")
        return real(name, *args)

    monkeypatch.setattr(repo, "_load", load)
    with pytest.raises(RuntimeError, match="the scan failed"):
        repo.load_new()
    assert repo.versions(TRANSLATOR) == [1]
    monkeypatch.undo()
    assert sorted(e.key for e in repo.load_new().loaded) == [f"{TRANSLATOR}:2", f"{LM}:2"]

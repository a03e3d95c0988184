"""The model repository: which model versions exist on disk and which are served.

Layout (export/README.md): `<root>/<name>/<version>/manifest.json`; folders whose name is
not a number (`checkpoint/`) are ignored. The newest `keep_versions` valid versions of each
name are loaded (every one when it is None), newest first, so a broken newest version leaves
the one before it; the highest number of a name is its default. `reload()` rescans and loads
new versions beside the running ones, so a deploy never has a moment without a model, and
tries again the folders that failed for a cause that may lie outside them (an engine that
did not start, a file that could not be read); a folder whose own files were refused is
checked again once one of them changes. A version that disappears from disk (or falls out of
`keep_versions`) is *retired* (by `prune()`, which the scheduler calls only once the new
versions take traffic): new requests no longer find it, requests already holding it
(`acquire`/`release`) finish, and when the last one leaves its drain hooks run, so the
scheduler can stop its loop and free its sessions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from export.manifest import Manifest, ManifestError, load_manifest, version_dirs
from service.domain import ModelNotFound, Task, Unavailable, UnavailableReason

log = logging.getLogger(__name__)
# What a call is told when the version it resolves takes no calls now, by Unavailable reason.
UNUSABLE: dict[UnavailableReason, str] = {
    "loading": "is loading; retry shortly",
    "draining": "is stopping; retry on another replica",
    "retired": "was retired by a reload; retry",
    "engine_failed": "stopped: its engine failed; retry on another replica",
}

DrainHook = Callable[["ModelVersion"], None]
FolderSignature = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class FolderFailure:
    """Why a version folder did not load. `signature`: its files' when their check refused
    it (ManifestError: a hash, the manifest), a verdict only a change to one of them can
    alter, so it is not checked again until one changes. None for any other failure (its
    engine did not start, a file could not be read: memory, a device, file descriptors, a
    flaky mount), whose cause may lie outside the folder, which the operator fixes there
    and then reloads: every reload tries such a folder again."""

    why: str
    signature: FolderSignature | None = None


def folder_signature(path: Path) -> FolderSignature:
    """Every file under a version folder with its size, modification and change times: a
    folder whose files failed the check is checked again once any of them changes (a copy
    finished, an ONNX file replaced), not only its manifest. The change time moves with a
    chmod or chown too, which fixes a file the server could not read (Permission denied)
    without touching its contents or modification time."""
    files = []
    try:
        found = sorted(path.rglob("*"))
    except OSError:  # a folder under it removed while we looked: retried once it settles
        found = []
    for file in found:
        try:
            stat = file.stat()
        except OSError:  # removed while we looked
            continue
        if file.is_file():
            files.append(
                (str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            )
    return tuple(files)


class ModelVersion:
    """One loaded version: its manifest, folder and in-flight request count."""

    def __init__(
        self, name: str, version: int, path: Path, manifest: Manifest, signature: FolderSignature
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.manifest = manifest
        self.signature = signature  # its files' as taken before their check
        self.task = Task(manifest.task)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._retired = False
        self._hooks: list[DrainHook] = []

    def changed_since_checked(self) -> bool:
        """Whether the folder's files are no longer those checked: the engine reads them
        after the check, and `export --replace` may swap the folder in between."""
        return folder_signature(self.path) != self.signature

    @property
    def key(self) -> str:
        """`name:version`, as Reload reports it."""
        return f"{self.name}:{self.version}"

    @property
    def facts(self) -> dict[str, str | int]:
        """The version as an error's facts name it (ServiceError.facts)."""
        return {"model": self.name, "version": self.version}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def retired(self) -> bool:
        return self._retired

    @property
    def drained(self) -> bool:
        """Retired and no request holds it any more."""
        return self._retired and self._in_flight == 0

    def acquire(self) -> None:
        """Hold the version for one request; refused once it is retired."""
        with self._lock:
            if self._retired:
                raise Unavailable(f"model {self.key} {UNUSABLE['retired']}", reason="retired")
            self._in_flight += 1

    def release(self) -> None:
        """The request holding the version is done; the last one of a retired one drains it."""
        with self._lock:
            if self._in_flight <= 0:
                raise RuntimeError(f"{self.key}: release() without acquire()")
            self._in_flight -= 1
            fire = self._retired and self._in_flight == 0
        if fire:
            self._run_hooks()

    def on_drained(self, hook: DrainHook) -> None:
        """Call `hook(self)` once the version is retired and has no request in flight
        (at once if that is already so)."""
        with self._lock:
            self._hooks.append(hook)
            fire = self._retired and self._in_flight == 0
        if fire:
            self._run_hooks()

    def retire(self) -> None:
        with self._lock:
            if self._retired:
                return
            self._retired = True
            fire = self._in_flight == 0
        if fire:
            self._run_hooks()

    def _run_hooks(self) -> None:
        with self._lock:
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            try:
                hook(self)
            except Exception:  # a failing hook must not stop the others
                log.exception("drain hook of %s failed", self.key)

    def __repr__(self) -> str:
        state = "retired" if self._retired else "live"
        return f"ModelVersion({self.key}, {self.task.value}, {state}, in_flight={self._in_flight})"


@dataclass
class ReloadResult:
    """What one scan changed. `failed` maps a version folder to why it was not loaded."""

    loaded: list[ModelVersion] = field(default_factory=list)
    retired: list[ModelVersion] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class ModelRepository:
    """Scans `root` and resolves (name or task default, version) to a loaded version.

    defaults: the model name served when a request names none, per task (e.g.
    {TRANSLATION: "en-es"}); a task without one falls back to its only model, or the first
    by name. keep_versions: how many of the newest versions per name stay loaded (None:
    every version on disk). variants: the engine's variant preference (e.g. ["int8",
    "fp32"]); only the first one a folder lists is hash-checked at load (None: all).
    """

    def __init__(
        self,
        root: str | Path,
        defaults: Mapping[Task, str] | None = None,
        keep_versions: int | None = None,
        variants: list[str] | None = None,
        verify_hashes: bool = True,
    ) -> None:
        if keep_versions is not None and keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 or None, got {keep_versions}")
        self.root = Path(root)
        self.defaults = dict(defaults or {})
        self.keep_versions = keep_versions
        self.variants = variants
        self.verify_hashes = verify_hashes
        self._lock = threading.RLock()
        self._models: dict[str, dict[int, ModelVersion]] = {}
        # Folders that failed to load. A rescan reports them each time, and checks again
        # those refused for their files only once a file in them changes (FolderFailure).
        self._failed: dict[Path, FolderFailure] = {}
        # Model folders a scan could not list, and why (logged once each).
        self._unreadable: dict[Path, str] = {}

    # --- scanning --------------------------------------------------------------------

    def _scan(self, unreadable: set[str] | None = None) -> dict[str, list[int]] | None:
        """Numbered version folders on disk by model name (newest last). A model folder
        that cannot be listed (no permission: `lost+found` on a volume, another user's
        upload; removed while scanned) is skipped with a warning, its name added to
        `unreadable`: one such folder must not fail the start or every reload. None when
        the repository itself cannot be listed (a volume unmounted, the folder moved away
        for a moment): what it holds is unknown, as for such a model folder, so a reload
        then must not take every model for removed and retire them all."""
        found: dict[str, list[int]] = {}
        try:
            model_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError as error:
            self._warn_unreadable(self.root, error)
            return None
        with self._lock:
            self._unreadable.pop(self.root, None)
            for gone in set(self._unreadable) - set(model_dirs):  # removed from disk
                del self._unreadable[gone]
        for model_dir in model_dirs:
            try:
                versions = version_dirs(model_dir)
            except OSError as error:
                if unreadable is not None:
                    unreadable.add(model_dir.name)
                self._warn_unreadable(model_dir, error)
                continue
            with self._lock:
                self._unreadable.pop(model_dir, None)
            if versions:
                found[model_dir.name] = versions
        return found

    def _warn_unreadable(self, model_dir: Path, error: OSError) -> None:
        """Log a folder that cannot be listed once (until it can be, or fails anew)."""
        why = error.strerror or str(error)
        with self._lock:
            if self._unreadable.get(model_dir) == why:
                return
            self._unreadable[model_dir] = why
        if model_dir == self.root:
            log.warning("%s", self._unlisted(why))
        else:
            log.warning("skipped model folder %s: cannot list it (%s)", model_dir, why)

    def _unlisted(self, why: str) -> str:
        return (
            f"cannot list the model repository {self.root} ({why}): nothing loaded or "
            "retired until it can be"
        )

    def reload(self) -> ReloadResult:
        """Load versions new on disk, then retire those gone from disk or beyond
        keep_versions (`load_new()` then `prune()`)."""
        result = self.load_new()
        result.retired = self.prune()
        return result

    def load_new(self, tried: Collection[str] = ()) -> ReloadResult:
        """Load the versions new on disk (within keep_versions); retire nothing yet. A
        caller that must start a new version before the one it replaces stops taking
        traffic (the scheduler) calls `prune()` once it has. A folder that failed for a
        cause that may lie outside it (FolderFailure) is tried again, unless it is in
        `tried`: the folders (as `failed` names them) that the same reload has tried
        already, so that its scan after an engine failed does not load that one again."""
        result = ReloadResult()
        unreadable: set[str] = set()
        found = self._scan(unreadable)
        if found is None:
            with self._lock:
                why = self._unreadable.get(self.root, "")
            result.failed[str(self.root)] = self._unlisted(why)
            return result
        with self._lock:  # failures of folders gone from disk: a server lives through many
            for path in list(self._failed):
                name = path.parent.name
                if name not in unreadable and path.name not in map(str, found.get(name, [])):
                    del self._failed[path]
        try:
            for name, versions in found.items():
                kept = 0  # newest first, until keep_versions load: a broken newest version
                for version in reversed(versions):  # leaves the one before it served
                    if self.keep_versions is not None and kept >= self.keep_versions:
                        break
                    with self._lock:
                        present = version in self._models.get(name, {})
                    if not present:
                        # Checked without the lock: hashing a version's files takes long,
                        # and lookups (every call, on the event loop) must not wait for it.
                        path = self.root / name / str(version)
                        entry = self._load(name, version, path, result, tried)
                        if entry is None:
                            continue
                        with self._lock:
                            self._models.setdefault(name, {})[version] = entry
                        result.loaded.append(entry)
                    kept += 1
        except BaseException:
            # The caller never sees the versions this scan added, so it would start none
            # of them, and the next scan would take them as present: listed, never served
            # ("loading" for good), and the versions they replace retired by the next
            # prune(). Take them back: the next scan loads them again.
            with self._lock:
                for entry in result.loaded:
                    loaded = self._models.get(entry.name, {})
                    if loaded.get(entry.version) is entry:
                        del loaded[entry.version]
                        if not loaded:
                            del self._models[entry.name]
            raise
        for entry in result.loaded:
            log.info("loaded model %s (%s) from %s", entry.key, entry.task.value, entry.path)
        return result

    def prune(self) -> list[ModelVersion]:
        """Retire the versions gone from disk or beyond keep_versions (of those loaded)."""
        unreadable: set[str] = set()
        found = self._scan(unreadable)
        if found is None:
            return []
        retired: list[ModelVersion] = []
        with self._lock:
            for name, loaded in list(self._models.items()):
                if name in unreadable:  # what it holds is unknown: retire none of it
                    continue
                # The newest keep_versions of those still on disk: a removed newest
                # version must not push out the older one loaded to replace it.
                on_disk = set(found.get(name, []))
                live = sorted(v for v in loaded if v in on_disk)
                keep = set(live if self.keep_versions is None else live[-self.keep_versions :])
                for version in sorted(loaded):
                    if version not in keep:
                        retired.append(loaded.pop(version))
                if not loaded:
                    del self._models[name]
        for entry in retired:
            entry.retire()
            log.info("retired model %s (%d in flight)", entry.key, entry.in_flight)
        return retired

    def _load(
        self, name: str, version: int, path: Path, result: ReloadResult, tried: Collection[str]
    ) -> ModelVersion | None:
        """Check one version folder (its manifest and file hashes), without the lock but
        for the failed-folder record, which discard() writes from the event loop."""
        signature = folder_signature(path)
        with self._lock:
            known = self._failed.get(path)
        if known is not None and known.signature == signature:
            result.failed[str(path)] = f"{known.why} (no file in it changed since it failed)"
            return None
        if known is not None and known.signature is None and str(path) in tried:
            result.failed[str(path)] = known.why
            return None
        try:
            manifest = load_manifest(
                path, variants=self._variants_of(path), verify_hashes=self.verify_hashes
            )
            if manifest.name != name:
                raise ManifestError(
                    f"{path}/manifest.json names model {manifest.name!r}, the folder is {name!r}"
                )
        except Exception as error:  # whatever is wrong with one folder fails that folder
            why = str(error) if isinstance(error, (ManifestError, OSError)) else repr(error)
            with self._lock:
                self._failed[path] = FolderFailure(
                    why, signature if isinstance(error, ManifestError) else None
                )
            result.failed[str(path)] = why
            log.error("cannot load %s: %s", path, why)
            return None
        with self._lock:
            self._failed.pop(path, None)
        return ModelVersion(name, version, path, manifest, signature)

    def _variants_of(self, path: Path) -> list[str] | None:
        """The variant the engine will serve: the first of `variants` (a preference order)
        that the folder lists, so only the files that will run are hash-checked."""
        if self.variants is None:
            return None
        try:
            listed = Manifest.model_validate_json((path / "manifest.json").read_text()).variants
        except Exception:  # load_manifest reports the real problem
            return None
        chosen = [str(v) for v in self.variants if v in listed]
        return chosen[:1] or None

    # --- lookup ----------------------------------------------------------------------

    def names_on_disk(self) -> set[str] | None:
        """Model folders that hold at least one numbered version folder, loaded or not;
        None when the repository itself cannot be listed (`unlisted` names the model
        folders this scan could not list)."""
        found = self._scan()
        return None if found is None else set(found)

    def unlisted(self) -> set[str] | None:
        """The model folders the last scan could not list; None if it could not list the
        repository itself."""
        with self._lock:
            if self.root in self._unreadable:
                return None
            return {path.name for path in self._unreadable}

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._models.get(name, {}))

    def all(self) -> list[ModelVersion]:
        """Every live version, by name then version."""
        with self._lock:
            return [
                self._models[n][v] for n in sorted(self._models) for v in sorted(self._models[n])
            ]

    def default_name(self, task: Task) -> str | None:
        with self._lock:
            preferred = self.defaults.get(task)
            if preferred is not None and preferred in self._models:
                return preferred
            of_task = [n for n in sorted(self._models) if self._task_of(n) is task]
            return of_task[0] if of_task else None

    def _task_of(self, name: str) -> Task | None:
        versions = self._models.get(name)
        if not versions:
            return None
        return versions[max(versions)].task

    def _listing(self, task: Task | None = None) -> str:
        parts = []
        for name in sorted(self._models):
            entry_task = self._task_of(name)
            if task is not None and entry_task is not task:
                continue
            versions = ", ".join(str(v) for v in sorted(self._models[name]))
            parts.append(f"{name} ({entry_task.value if entry_task else '?'}: versions {versions})")
        return "; ".join(parts) if parts else "none"

    def get(
        self,
        name: str = "",
        version: int | None = None,
        task: Task | None = None,
        unusable: Callable[[ModelVersion], UnavailableReason | None] | None = None,
    ) -> ModelVersion:
        """The version serving (name, version); name "" means the task's default model,
        version None (or 0) the newest one. `unusable` says why a version takes no calls
        now (None: it does; e.g. "loading" until its engine is warm) and narrows the
        choice: the newest usable version is taken, so a version still loading never
        takes traffic from the one before it. Raises ModelNotFound listing what is loaded,
        Unavailable (with the newest candidate's reason) when the version exists but none
        is usable."""
        with self._lock:
            if not name:
                if task is None:
                    raise ModelNotFound("no model named and no task given to pick a default")
                default = self.default_name(task)
                if default is None:
                    raise ModelNotFound(
                        f"no {task.value} model is loaded; loaded models: {self._listing()}"
                    )
                name = default
            versions = self._models.get(name)
            if not versions:
                what = f"{task.value} models" if task is not None else "models"
                raise ModelNotFound(
                    f"model {name!r} is not loaded; loaded {what}: {self._listing(task)}",
                    model=name,
                )
            if version and version not in versions:
                raise ModelNotFound(
                    f"model {name!r} has no version {version}; loaded versions: "
                    f"{', '.join(str(v) for v in sorted(versions))}",
                    model=name,
                    version=version,
                )
            newest = versions[version or max(versions)]
            if task is not None and newest.task is not task:
                raise ModelNotFound(
                    f"model {name!r} is a {newest.task.value} model, not {task.value}; "
                    f"loaded {task.value} models: {self._listing(task)}",
                    model=name,
                )
            if unusable is None:
                return newest
            candidates = (
                [versions[version]]
                if version
                else [versions[v] for v in sorted(versions, reverse=True)]
            )
            reasons: list[UnavailableReason] = []
            for entry in candidates:
                reason = unusable(entry)
                if reason is None:
                    return entry
                reasons.append(reason)
            raise Unavailable(f"model {newest.key} {UNUSABLE[reasons[0]]}", reason=reasons[0])

    def discard(self, entry: ModelVersion, reason: str) -> None:
        """Drop a version that could not be served (its engine failed to load); the next
        reload tries its folder again."""
        with self._lock:
            versions = self._models.get(entry.name, {})
            if versions.get(entry.version) is entry:
                del versions[entry.version]
                if not versions:
                    del self._models[entry.name]
            self._failed[entry.path] = FolderFailure(reason)
        log.error("discarded model %s: %s", entry.key, reason)
        entry.retire()


__all__ = ["DrainHook", "ModelRepository", "ModelVersion", "ReloadResult"]

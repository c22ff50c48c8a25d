"""The run directory: where stages put their artifacts, and how they know whether they are cached.

Layout: `<run>/<stage dir>/…` holds a stage's artifacts and, written last, its `stage.json` manifest
(parameters, input fingerprints, output fingerprints, package versions, wall time, row counts, stats).

A stage is *cached* when its manifest exists, is unedited (it records a digest of its own content), was
made with the same key (its parameters plus the fingerprints of its inputs) and every output listed there
still has the recorded size and content hash; anything else reruns it. Downstream stages key on the
manifest's `fingerprint`, which covers the outputs and the manifest's content (parameters, rows,
statistics such as `category_word`), so nothing a later stage reads from a manifest escapes its key. A stage writes into a partial directory `<run>/.partial/<stage>-<key>` and only
when it has finished is the manifest written and the directory renamed into place, so a killed stage
never leaves an artifact that a later stage would accept. Resumable stages (sft, decode) keep their
partial directory after a failure and pick it up again on the next run with the same key.

A stage directory is `<run>/<stage folder>/NAME` (or `<run>/data`, `<run>/ig`) with NAME a valid artifact
name (`options.check_artifact_name`), reached through no symbolic link: publishing removes the previous
directory, and must never remove anything else. While a stage writes, it holds an exclusive lock on
`<run>/.partial/<stage folder>__NAME.lock`, so a second process writing the same artifact is refused at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from igdrec import options
from igdrec.console import console
from igdrec.errors import IgdrecError

MANIFEST = "stage.json"
# Manifest fields that describe a particular execution rather than what it produced: left out of the
# fingerprint so that a rerun which writes the same artifacts keeps downstream stages cached.
_RUN_RECORD_FIELDS = ("fingerprint", "digest", "versions", "wall_time_s", "created_at")
DEFAULT_RUN_DIR = "runs/default"
SINGLE_STAGE_PATHS = ("data", "ig")  # the stages with one artifact per run; any other is <stage folder>/NAME
PARTIAL = ".partial"  # in the run: the work directories of unfinished stages and the artifacts' locks
# `.partial/<stage path, '/' as '__'>-<first 16 hex of the key>` and `.partial/<stage path, '/' as '__'>.lock`
_PARTIAL_ENTRY = re.compile(r"(?P<flat>.+?)(?:-(?P<key>[0-9a-f]{16})|(?P<lock>\.lock))")
_TRACKED_PACKAGES = ("igdrec", "torch", "transformers", "peft", "polars", "numpy", "typer", "rich", "gguf")


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fingerprint_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_obj(obj: Any) -> str:
    return fingerprint_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def cache_key(stage: str, params: dict, inputs: dict) -> str:
    """A stage's cache key: its name, its key parameters and the fingerprints of its inputs."""
    return fingerprint_obj({"stage": stage, "params": params, "inputs": inputs})


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    return Path(run_dir or os.environ.get("IGDREC_RUN_DIR") or DEFAULT_RUN_DIR)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write a file through `write(temporary_path)`, then rename it onto `path` in one step.

    The temporary file is a hidden sibling (same directory, so the rename is atomic), so a reader, or
    a process killed mid-write, sees the old file or the new one, never half of one. A failed write
    removes the temporary file and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if disk_full(exc):
            raise IgdrecError(f"{path}: no space left on the device; the file was left as it was (free some space and rerun)") from exc
        raise
    return path


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or an exceeded quota; polars reports one as a
    ComputeError whose text ends in "(os error 28)"."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if not isinstance(exc, (OSError, IgdrecError)) and any(
            f"(os error {code})" in str(exc) for code in (errno.ENOSPC, errno.EDQUOT)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _remove(path: Path) -> None:
    """Remove a directory tree, a file or a symbolic link (the link only, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunDir:
    def __init__(self, root: str | Path | None):
        self.root = resolve_run_dir(root)

    def stage_dir(self, stage_path: str) -> Path:
        return self.root / stage_path

    def ensure_writable(self) -> None:
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is a file" if existing == self.root else f"cannot be created: {existing} is a file"
            raise IgdrecError(f"run directory {self.root} {where}, not a directory; choose another --run-dir")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise IgdrecError(f"run directory {self.root} is not writable: {exc.strerror or exc}") from exc

    def manifest(self, stage_path: str) -> dict | None:
        """The stage's manifest if the stage finished, its manifest is unedited and its outputs are intact, else None."""
        return self.checked_manifest(stage_path)[0]

    def cached_manifest(self, stage_path: str, key: str) -> dict | None:
        """The stage's intact manifest if it was made with `key` (the stage's result is cached), else None."""
        manifest = self.manifest(stage_path)
        return manifest if manifest is not None and manifest.get("key") == key else None

    def require(self, stage_path: str, hint: str) -> dict:
        """The manifest of an upstream stage, or a one-line error telling the user what to run first."""
        manifest, problem = self.checked_manifest(stage_path)
        if manifest is None:
            raise IgdrecError(f"{problem}; run `{hint}` first")
        return manifest

    def checked_manifest(self, stage_path: str) -> tuple[dict | None, str | None]:
        """(manifest, None) when the stage's artifacts can be used, else (None, why not)."""
        where = self.stage_dir(stage_path)
        path = where / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            return None, f"{where} has no finished, intact artifacts"
        except (OSError, ValueError):
            return None, f"{path} is unreadable or not JSON"
        if not isinstance(manifest, dict) or manifest.get("digest") != manifest_digest(manifest):
            # Hand-edited (or from an igdrec that wrote no digest): its statistics and fingerprints
            # can no longer be trusted, and stages downstream would not notice the change.
            return None, f"{path} was changed after its stage wrote it (its content digest does not match)"
        if not outputs_intact(where, manifest):
            return None, f"{where} has no finished, intact artifacts (an output changed after the stage wrote it)"
        return manifest, None

    def unfinished(self) -> dict[str, dict]:
        """What stages left in `.partial` (interrupted, or being written now): stage path -> {"work": the
        work directories' names, "lock": the lock's holder text ("igdrec pid N"), or None without a lock}.
        Entries that name no valid stage path are not igdrec's and are left out; nothing is followed."""
        partial = self.root / PARTIAL
        if partial.is_symlink() or not partial.is_dir():
            return {}
        found: dict[str, dict] = {}
        for entry in sorted(os.scandir(partial), key=lambda e: e.name):
            match = _PARTIAL_ENTRY.fullmatch(entry.name)
            if match is None:
                continue
            stage_path = match["flat"].replace("__", "/", 1)
            parts = stage_path.split("/")
            if len(parts) != 2 and stage_path not in SINGLE_STAGE_PATHS or not all(map(options.ARTIFACT_NAME.fullmatch, parts)):
                continue
            record = found.setdefault(stage_path, {"work": [], "lock": None})
            if match["lock"] and entry.is_file(follow_symlinks=False):
                record["lock"] = _lock_holder(Path(entry.path))
            elif match["key"] and entry.is_dir(follow_symlinks=False):
                record["work"].append(entry.name)
        return {path: record for path, record in found.items() if record["work"] or record["lock"] is not None}

    def artifact(self, stage_path: str, name: str) -> Path:
        return self.stage_dir(stage_path) / name

    def finished_names(self, stage_root: str) -> list[str]:
        """Names of the published stages under `<run>/<stage_root>/` (e.g. every decode)."""
        root = self.stage_dir(stage_root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).exists())

    def resolve_name(self, stage_root: str, name: str | None, option: str) -> str:
        """`name`, or the only finished stage under `stage_root` when the user left `option` out."""
        if name is not None:
            return name
        names = self.finished_names(stage_root)
        if len(names) != 1:
            found = ", ".join(names) or "none"
            raise IgdrecError(f"{self.stage_dir(stage_root)}: pass {option} NAME; finished: {found}")
        return names[0]


def _flat(stage_path: str) -> str:
    """A stage path as one file name in `.partial` (folders hold no '__', so the first one is the '/')."""
    return stage_path.replace("/", "__")


def _lock_holder(path: Path) -> str:
    """What a lock file says about its writer ("igdrec pid N"), read without following a link or blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        return os.read(fd, 64).decode(errors="replace").strip() if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)


def manifest_digest(manifest: dict) -> str:
    """Digest of a manifest's content, excluding the digest itself (recorded in it as `digest`)."""
    return fingerprint_obj({k: v for k, v in manifest.items() if k != "digest"})


def manifest_fingerprint(manifest: dict) -> str:
    """What downstream stages key on: the outputs and everything else the manifest says about them."""
    return fingerprint_obj({k: v for k, v in manifest.items() if k not in _RUN_RECORD_FIELDS})


def outputs_intact(directory: Path, manifest: dict) -> bool:
    """Whether every output the manifest lists is still the regular file it recorded (size, then content).

    A manifest is read from the run directory, so its output names are checked before they are opened: a
    name that climbs out of the artifact, or passes through a symbolic link, is not an intact output."""
    outputs = manifest.get("outputs", {})
    if not isinstance(outputs, dict):
        return False
    for rel, info in outputs.items():
        path = _output_path(directory, rel)
        if path is None or not isinstance(info, dict):
            return False
        try:
            status = path.lstat()
            if not stat.S_ISREG(status.st_mode) or status.st_size != info.get("bytes"):
                return False
            if fingerprint_file(path) != info.get("fingerprint"):
                return False
        except (OSError, ValueError):  # gone, unreadable, or a NUL in the name
            return False
    return True


def _output_path(directory: Path, rel: str) -> Path | None:
    """`directory / rel` for a relative name that stays inside `directory` through no symbolic link, else None."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or PurePosixPath(rel).is_absolute() or any(part in ("..", ".") for part in parts):
        return None
    if any(directory.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))):
        return None
    return directory.joinpath(*parts)


@dataclass
class StageWriter:
    """Writes one stage's artifacts; use as a context manager, check `cached` first.

        with StageWriter(run, "data", stage="preprocess", params=..., inputs=...) as out:
            if out.cached:
                return out.manifest
            df.write_parquet(out.path("items.parquet")); out.rows["items"] = df.height
    """

    run: RunDir
    stage_path: str
    stage: str
    params: dict
    inputs: dict[str, str] = field(default_factory=dict)
    force: bool = False
    resumable: bool = False
    stats: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = self.stage_path.split("/")
        if len(parts) != 2 and self.stage_path not in SINGLE_STAGE_PATHS:
            raise IgdrecError(f"{self.stage} stage path {self.stage_path!r}: expected <stage folder>/NAME "
                              f"(or one of {', '.join(SINGLE_STAGE_PATHS)})")
        for part in parts:
            options.check_artifact_name(part, f"{self.stage} name")  # also what a default name is made of
        self.key = cache_key(self.stage, self.params, self.inputs)
        self.final_dir = self.run.stage_dir(self.stage_path)
        self.partial_dir = self.run.root / PARTIAL / f"{_flat(self.stage_path)}-{self.key[:16]}"
        self.lock_path = self.run.root / PARTIAL / f"{_flat(self.stage_path)}.lock"
        self._lock_fd: int | None = None
        self.manifest: dict | None = None if self.force else self.run.cached_manifest(self.stage_path, self.key)
        self.cached = self.manifest is not None

    def report_cached(self) -> None:
        """The one message every stage prints when it finds its result cached."""
        console.print(f"{self.stage_path}: cached in {self.final_dir} (same parameters and inputs; --force reruns it)", soft_wrap=True)

    def __enter__(self) -> "StageWriter":
        if self.cached:
            return self
        self.run.ensure_writable()
        self._refuse_links()
        self._lock()
        try:
            if self.partial_dir.exists() and not (self.resumable and not self.force):
                _remove(self.partial_dir)
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self._unlock()
            raise
        self._started = time.perf_counter()
        return self

    def path(self, name: str) -> Path:
        """Where to write artifact `name` (relative to the stage directory) while the stage runs."""
        target = self.partial_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.cached:
            return False
        try:
            if exc is None:
                try:
                    self._commit()
                except BaseException as failure:  # a failed publish fails the stage the same way
                    self._discard(failure)
                    raise
            else:
                self._discard(exc)
        finally:
            self._unlock()
        return False

    def _discard(self, exc: BaseException) -> None:
        """After a failure: drop the partial directory (a resumable stage keeps it) and turn a full disk
        into a one-line error that names the artifact."""
        if not self.resumable:
            _remove(self.partial_dir)
        if disk_full(exc) and not isinstance(exc, IgdrecError):
            kept = f"; its finished part stays in {self.partial_dir} for a rerun" if self.resumable else ""
            raise IgdrecError(f"{self.stage_path}: no space left on the device of {self.run.root} while writing it; "
                              f"nothing was published{kept} (free some space and rerun)") from exc

    # --- the stage directory and its lock

    def _refuse_links(self) -> None:
        """Refuse a stage directory (or a folder on the way to it, or `.partial`) that is a symbolic link:
        replacing it would remove or overwrite what the link points to."""
        root = self.run.root
        parts = self.stage_path.split("/")
        for path in (root / PARTIAL, *(root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1))):
            if path.is_symlink():
                raise IgdrecError(f"{path} is a symbolic link (to {os.readlink(path)}); igdrec replaces only directories "
                                  "it made itself: remove the link (what it points to stays) and rerun")
        # With valid names and no links the stage directory lies inside the run; checked, not assumed.
        resolved = root.resolve()
        if self.final_dir.resolve() != resolved.joinpath(*parts) or resolved not in self.final_dir.resolve().parents:
            raise IgdrecError(f"{self.final_dir}: does not lie inside the run directory {root}; refusing to replace it")

    def _lock(self) -> None:
        """Take the artifact's lock, or refuse at once naming the process that holds it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:  # e.g. a symbolic link planted in its place
                raise IgdrecError(f"{self.lock_path}: cannot open the artifact's lock ({exc.strerror or exc})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise IgdrecError(f"{self.stage_path}: {holder} is writing it now (lock {self.lock_path}); "
                                  "wait for it to finish, or stop it, and rerun") from None
            # The previous holder removes the file as it lets go: a lock on a file no longer at the path
            # excludes nobody, so open the path again.
            try:
                current = os.stat(self.lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"igdrec pid {os.getpid()}".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        self.lock_path.unlink(missing_ok=True)  # while still held, so no one takes a lock on it in between
        os.close(self._lock_fd)
        self._lock_fd = None

    def _commit(self) -> None:
        outputs = {}
        for path in sorted(p for p in self.partial_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.partial_dir).as_posix()
            if rel == MANIFEST:
                continue
            outputs[rel] = {"bytes": path.stat().st_size, "fingerprint": fingerprint_file(path)}
        self.manifest = {
            "stage": self.stage,
            "stage_path": self.stage_path,
            "key": self.key,
            "params": self.params,
            "inputs": self.inputs,
            "outputs": outputs,
            "rows": self.rows,
            "stats": self.stats,
            "versions": package_versions(),
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # Fingerprint and digest are taken of the manifest as it will read back from JSON.
        self.manifest = json.loads(json.dumps(self.manifest, sort_keys=True, default=str))
        self.manifest["fingerprint"] = manifest_fingerprint(self.manifest)
        self.manifest["digest"] = manifest_digest(self.manifest)
        # The manifest goes in last, then one rename publishes the whole directory.
        write_json_atomic(self.partial_dir / MANIFEST, self.manifest)
        self._refuse_links()  # again: a link may have appeared while the stage ran
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if self.final_dir.exists():
            if self.final_dir.is_dir():
                (self.final_dir / MANIFEST).unlink(missing_ok=True)
            trash = self.final_dir.with_name(f".{self.final_dir.name}.old-{os.getpid()}")
            _remove(trash)  # left by a crashed process that had our pid
            os.replace(self.final_dir, trash)
        os.replace(self.partial_dir, self.final_dir)
        if trash is not None:
            _remove(trash)

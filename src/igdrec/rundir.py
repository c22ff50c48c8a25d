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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from igdrec.console import console
from igdrec.errors import IgdrecError

MANIFEST = "stage.json"
# Manifest fields that describe a particular execution rather than what it produced: left out of the
# fingerprint so that a rerun which writes the same artifacts keeps downstream stages cached.
_RUN_RECORD_FIELDS = ("fingerprint", "digest", "versions", "wall_time_s", "created_at")
DEFAULT_RUN_DIR = "runs/default"
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
        return self._checked_manifest(stage_path)[0]

    def require(self, stage_path: str, hint: str) -> dict:
        """The manifest of an upstream stage, or a one-line error telling the user what to run first."""
        manifest, problem = self._checked_manifest(stage_path)
        if manifest is None:
            raise IgdrecError(f"{problem}; run `{hint}` first")
        return manifest

    def _checked_manifest(self, stage_path: str) -> tuple[dict | None, str | None]:
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


def manifest_digest(manifest: dict) -> str:
    """Digest of a manifest's content, excluding the digest itself (recorded in it as `digest`)."""
    return fingerprint_obj({k: v for k, v in manifest.items() if k != "digest"})


def manifest_fingerprint(manifest: dict) -> str:
    """What downstream stages key on: the outputs and everything else the manifest says about them."""
    return fingerprint_obj({k: v for k, v in manifest.items() if k not in _RUN_RECORD_FIELDS})


def outputs_intact(directory: Path, manifest: dict) -> bool:
    for rel, info in manifest.get("outputs", {}).items():
        path = directory / rel
        try:
            if path.stat().st_size != info["bytes"]:
                return False
        except OSError:
            return False
        if fingerprint_file(path) != info["fingerprint"]:
            return False
    return True


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
        self.key = fingerprint_obj({"stage": self.stage, "params": self.params, "inputs": self.inputs})
        self.final_dir = self.run.stage_dir(self.stage_path)
        safe = self.stage_path.replace("/", "__")
        self.partial_dir = self.run.root / ".partial" / f"{safe}-{self.key[:16]}"
        self.manifest: dict | None = None
        existing = None if self.force else self.run.manifest(self.stage_path)
        self.cached = existing is not None and existing.get("key") == self.key
        if self.cached:
            self.manifest = existing

    def report_cached(self) -> None:
        """The one message every stage prints when it finds its result cached."""
        console.print(f"{self.stage_path}: cached in {self.final_dir} (same parameters and inputs; --force reruns it)", soft_wrap=True)

    def __enter__(self) -> "StageWriter":
        if self.cached:
            return self
        self.run.ensure_writable()
        if self.partial_dir.exists() and not (self.resumable and not self.force):
            shutil.rmtree(self.partial_dir)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
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
        if exc_type is not None:
            if not self.resumable:
                shutil.rmtree(self.partial_dir, ignore_errors=True)
            return False
        self._commit()
        return False

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
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if self.final_dir.exists():
            (self.final_dir / MANIFEST).unlink(missing_ok=True)
            trash = self.final_dir.with_name(f".{self.final_dir.name}.old-{os.getpid()}")
            shutil.rmtree(trash, ignore_errors=True)  # left by a crashed process that had our pid
            os.replace(self.final_dir, trash)
        os.replace(self.partial_dir, self.final_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

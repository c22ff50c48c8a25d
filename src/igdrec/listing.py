"""What a run directory holds (`igdrec ls`): one row per artifact with its stage, the key parameters it was
made with that differ from their defaults, its status, its wall time and, for a metrics result, its
headline numbers.

Status, as the runner would see the artifact (rundir.py, runner.py):

- done: the manifest is unedited, every output is intact and every input it recorded is current;
- stale: an input changed since: the upstream fingerprint it recorded (`inputs`) is no longer the
  `fingerprint` of any intact artifact of the run, or that artifact is stale or broken itself, so the
  stages that read it would make it again;
- partial: only a work directory or a lock in `.partial` (a stage interrupted, or being written now);
- broken: no usable manifest (unreadable, edited, an output changed, a symbolic link): the reason says why.

A stage whose config names input files (`option(input=True)`: preprocess) keys on those files' contents;
their paths are not recorded, so its inputs are not checked here. A run directory is read as data: no
manifest value becomes code, a path or a file to open beyond the artifact's own outputs, and no symbolic
link inside it is followed. A grid's run root (no artifacts of its own, one run directory per dataset)
lists each dataset's run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.table import Table

from igdrec import options
from igdrec.config import STAGE_CONFIGS, STAGE_ORDER
from igdrec.console import console, shown
from igdrec.errors import IgdrecError
from igdrec.rundir import MANIFEST, PARTIAL, SINGLE_STAGE_PATHS, RunDir, manifest_fingerprint

DONE, STALE, PARTIAL_STATUS, BROKEN = "done", "stale", "partial", "broken"
# A manifest lists parameters, fingerprints and statistics: kilobytes. A larger one is not igdrec's.
MAX_MANIFEST_BYTES = 16 << 20


@dataclass
class Artifact:
    """One row of `igdrec ls` (and one object of `igdrec ls --json`)."""

    path: str  # stage path in the run: data, ig, sft/NAME, ...
    stage: str
    name: str  # NAME of <stage folder>/NAME; "" for data and ig
    status: str  # DONE, STALE, PARTIAL_STATUS or BROKEN
    note: str = ""  # why it is stale, partial or broken (one line); an unfinished rerun of a finished one
    params: dict = field(default_factory=dict)  # key parameters that differ from their defaults
    wall_time_s: float | None = None
    metrics: dict = field(default_factory=dict)  # a metrics result's headline numbers
    dataset: str | None = None  # the run directory's name under a grid's run root


def list_runs(root: str | Path) -> list[Artifact]:
    """The artifacts of the run directory `root`, or of every dataset's run under a grid's run root."""
    root = Path(root)
    if not root.is_dir():
        raise IgdrecError(f"{root}: no such run directory" if not root.exists() else f"{root}: not a directory")
    try:
        return _list_runs(root)
    except OSError as exc:  # a folder of the run that this user may not read
        raise IgdrecError(f"{exc.filename or root}: cannot be read ({exc.strerror or exc})") from exc


def _list_runs(root: Path) -> list[Artifact]:
    if is_run(root):
        return list_run(RunDir(root))
    rows = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False) and is_run(Path(entry.path)):
            rows += [replace(row, dataset=entry.name) for row in list_run(RunDir(entry.path))]
    return rows


def is_run(directory: Path) -> bool:
    """Whether `directory` is a run directory: every pipeline starts with `data` (and writes it under
    `.partial` first)."""
    return any((directory / name).is_dir() and not (directory / name).is_symlink() for name in (*SINGLE_STAGE_PATHS, PARTIAL))


def list_run(run: RunDir) -> list[Artifact]:
    """Every artifact of one run directory, in pipeline order."""
    found = {path: _read(run, path) for path in _stage_paths(run.root)}
    manifests = {path: m for path, (m, _) in found.items() if m is not None}
    by_fingerprint = {m["fingerprint"]: path for path, m in manifests.items()}
    stage_of_folder = {path.split("/")[0]: m["stage"] for path, m in manifests.items()}
    rows: dict[str, Artifact] = {}
    stale: dict[str, str | None] = {}  # path -> why it is stale (None: current), filled as it is asked

    # Upstream first, and no loop: a fingerprint covers the inputs it records (checked in `_malformed`).
    def why_stale(path: str) -> str | None:
        if path not in stale:
            stale[path] = _why_stale(manifests[path], by_fingerprint, why_stale)
        return stale[path]

    for path, (manifest, problem) in found.items():
        if manifest is None:
            rows[path] = _row(path, stage_of_folder, BROKEN, problem)
            continue
        reason = why_stale(path)
        rows[path] = Artifact(
            path=path, stage=manifest["stage"], name=_name(path), status=STALE if reason else DONE, note=reason or "",
            params=changed_params(manifest["stage"], manifest["params"]), wall_time_s=_seconds(manifest.get("wall_time_s")),
            metrics=headline_metrics(manifest) if manifest["stage"] == "metrics" else {},
        )
    for path, left in run.unfinished().items():
        what = _unfinished_note(left)
        if path in rows:
            rows[path].note = "; ".join(filter(None, [rows[path].note, f"an unfinished rerun: {what}"]))
        else:
            rows[path] = _row(path, stage_of_folder, PARTIAL_STATUS, what)
    order = {stage: index for index, stage in enumerate(STAGE_ORDER)}
    return sorted(rows.values(), key=lambda row: (order.get(row.stage, len(order)), row.path))


def changed_params(stage: str, params: dict) -> dict:
    """The key parameters of `params` whose value is not the stage config's default; those the stage
    resolved itself (a tokenizer's identity) are left out. An unregistered stage shows all of them."""
    config = STAGE_CONFIGS.get(stage)
    if config is None:
        return dict(params)
    defaults = {opt.in_key_as: opt.default for opt in options.options(config) if opt.role == options.KEY}
    return {key: value for key, value in params.items() if key in defaults and _as_json(value) != _as_json(defaults[key])}


def headline_metrics(manifest: dict) -> dict:
    """NDCG and HR at the list length the result's diversity statistics look at (`diversity_k`), or at its
    largest K where that one was dropped (lists shorter than K)."""
    stats = manifest.get("stats")
    if not isinstance(stats, dict):
        return {}
    ks = sorted(int(key[5:]) for key in stats if key.startswith("NDCG@") and key[5:].isdigit())
    if not ks:
        return {}
    k = manifest["params"].get("diversity_k")
    k = k if k in ks else ks[-1]
    found = {f"{metric}@{k}": stats.get(f"{metric}@{k}") for metric in ("NDCG", "HR")}
    return {key: value for key, value in found.items() if _finite(value)}


def to_json(root: str | Path, rows: list[Artifact]) -> str:
    return json.dumps({"run_dir": str(root), "artifacts": [asdict(row) for row in rows]}, ensure_ascii=False)


def from_json(text: str) -> list[Artifact]:
    return [Artifact(**row) for row in json.loads(text)["artifacts"]]


def print_listing(root: str | Path, rows: list[Artifact]) -> None:
    if not rows:
        console.print(shown(f"{root}: no artifacts"))
        return
    table = Table(title=shown(f"{root}: {len(rows)} artifacts"))
    metrics = list(dict.fromkeys(key for row in rows for key in row.metrics))  # one column per headline metric
    grid = any(row.dataset is not None for row in rows)
    notes = any(row.note for row in rows)
    for column in [*(["dataset"] if grid else []), "stage", "name"]:
        table.add_column(column, no_wrap=True)
    table.add_column("parameters")  # those that differ from the defaults
    table.add_column("status", no_wrap=True)
    for column in ["wall time", *metrics]:
        table.add_column(column, justify="right", no_wrap=True)
    if notes:
        table.add_column("note")
    styles = {DONE: "green", STALE: "yellow", PARTIAL_STATUS: "cyan", BROKEN: "red"}
    for row in rows:
        status = shown(row.status)
        status.stylize(styles.get(row.status, ""))
        table.add_row(
            *([shown(row.dataset or "")] if grid else []), shown(row.stage), shown(row.name),
            shown(" ".join(f"{key}={_format_param(value)}" for key, value in row.params.items())),
            status, "" if row.wall_time_s is None else format_seconds(row.wall_time_s),
            *(f"{row.metrics[key]:.4f}" if key in row.metrics else "" for key in metrics),
            *([shown(row.note)] if notes else []),
        )
    console.print(table)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# ---------------------------------------------------------------------------------------------------
# Reading one run directory


def _stage_paths(root: Path) -> list[str]:
    """The stage paths of the run: data and ig, and <stage folder>/NAME for the others (dot names are
    igdrec's own: `.partial`, a replaced directory on its way out)."""
    paths = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.name in SINGLE_STAGE_PATHS or entry.is_symlink():
            paths.append(entry.name)  # a link is listed, as broken: it is not followed
        elif entry.is_dir(follow_symlinks=False):
            paths += [f"{entry.name}/{sub.name}" for sub in sorted(os.scandir(entry.path), key=lambda e: e.name)
                      if not sub.name.startswith(".") and (sub.is_symlink() or sub.is_dir(follow_symlinks=False))]
    return paths


def _read(run: RunDir, path: str) -> tuple[dict | None, str]:
    """(manifest, "") for an artifact the runner would use, else (None, why not) on one line."""
    where = run.root / path  # its folder is no link: `_stage_paths` lists a linked folder as the path
    if where.is_symlink():
        return None, f"{path} is a symbolic link (to {os.readlink(where)}); not followed"
    if not where.is_dir():
        return None, f"{path} is not a directory"
    manifest_path = where / MANIFEST
    if manifest_path.is_symlink():
        return None, f"{MANIFEST} is a symbolic link; not followed"
    if not manifest_path.is_file():
        return None, f"{MANIFEST} is not a regular file" if manifest_path.exists() else f"no {MANIFEST}: not a finished artifact"
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest"
    except OSError as exc:
        return None, f"{MANIFEST} cannot be read ({exc.strerror or exc})"
    manifest, problem = run.checked_manifest(path)
    if manifest is None:
        return None, problem.replace(f"{run.root}/", "")
    wrong = _malformed(manifest)
    return (None, wrong) if wrong else (manifest, "")


def _malformed(manifest: dict) -> str:
    """Why an unedited manifest cannot be listed ("" if it can): the fields `ls` reads, of the wrong type."""
    expected = {"stage": str, "params": dict, "inputs": dict, "fingerprint": str}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            return f"{MANIFEST}: {key} is missing or not a {kind.__name__}"
    if not all(isinstance(value, str) for value in manifest["inputs"].values()):
        return f"{MANIFEST}: inputs holds a fingerprint that is not a string"
    if manifest["fingerprint"] != manifest_fingerprint(manifest):
        return f"{MANIFEST}: its fingerprint is not the fingerprint of its content"
    return ""


def _why_stale(manifest: dict, by_fingerprint: dict[str, str], upstream_stale) -> str | None:
    """Why an artifact is stale, or None: each input it recorded must still be the fingerprint of a
    current artifact of the run. `upstream_stale(path)` says whether (why) that artifact is stale."""
    config = STAGE_CONFIGS.get(manifest["stage"])
    if config is not None and any(opt.role == options.INPUT_FILE for opt in options.options(config)):
        return None  # it reads files outside the run (module docstring)
    for name, fingerprint in sorted(manifest["inputs"].items()):
        upstream = by_fingerprint.get(fingerprint)
        if upstream is None:
            return f"its {name} input changed since it was made"
        if upstream_stale(upstream):
            return f"its {name} input ({upstream}) is stale"
    return None


def _row(path: str, stage_of_folder: dict[str, str], status: str, note: str) -> Artifact:
    """A row without a usable manifest: its stage is the one whose artifacts share its folder, else the folder."""
    folder = path.split("/")[0]
    return Artifact(path=path, stage=stage_of_folder.get(folder, folder), name=_name(path), status=status, note=note)


def _unfinished_note(left: dict) -> str:
    holder = left["lock"]
    if holder is not None:
        pid = holder.removeprefix("igdrec pid ")
        if pid.isdigit() and 0 < int(pid) < 2**31 and _alive(int(pid)):
            return f"being written now by {holder}"
        return f"interrupted (lock of {holder or 'an unnamed process'}, not running)"
    return f"interrupted (work directory {PARTIAL}/{left['work'][-1]})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _name(path: str) -> str:
    return path.partition("/")[2]


def _seconds(value) -> float | None:
    return float(value) if _finite(value) and value >= 0 else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_json(value):
    """A value as it reads back from a manifest (tuples as lists, 1e-4 as 0.0001)."""
    return json.loads(json.dumps(value, default=str))


def _format_param(value) -> str:
    if isinstance(value, list):
        return ",".join(map(_format_param, value))
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (dict, type(None))) else str(value)

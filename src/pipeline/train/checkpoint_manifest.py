"""Every checkpoint carries a manifest from each rank: the size and SHA-256 of every file that rank
wrote. A resume checks them before loading anything, so a truncated or garbled checkpoint (a full
disk, a half-finished copy, a bad block) is passed over for the one before it, never trained on.

Each rank writes its own manifest because Ray Train gathers the ranks' folders into one checkpoint
folder: no rank sees the others' files before they land in storage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.fs as pafs
import ray.train

MANIFEST = "manifest.rank{}.json"


def _fingerprint(path: Path) -> dict:
    with path.open("rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def write_manifest(directory: Path, rank: int, world_size: int) -> None:
    """Call last, after this rank wrote its files into `directory`."""
    files = {
        str(p.relative_to(directory)): _fingerprint(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith("manifest.rank")
    }
    (directory / MANIFEST.format(rank)).write_text(json.dumps({"world_size": world_size, "files": files}))


def damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint folder: the first missing manifest or file that does not match
    its rank's manifest; None when it is whole."""
    world_size = 1
    rank = 0
    while rank < world_size:
        manifest = directory / MANIFEST.format(rank)
        try:
            written = json.loads(manifest.read_text())
            world_size, files = written["world_size"], written["files"]
        except (OSError, ValueError, KeyError):
            return f"{manifest.name} is missing or unreadable (a checkpoint cut off while it was written)"
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if (size := path.stat().st_size) != expected["bytes"]:
                return f"{name} has {size} bytes, {expected['bytes']} were written"
            if _fingerprint(path)["sha256"] != expected["sha256"]:
                return f"{name} does not hold what was written (its SHA-256 differs)"
        rank += 1
    return None


def candidates(latest: ray.train.Checkpoint | None) -> list[ray.train.Checkpoint]:
    """The checkpoint Ray Train resumes from, then the run's older ones in storage, newest first (Ray
    names them checkpoint_<timestamp>, so the names sort by age)."""
    if latest is None:
        return []
    fs = latest.filesystem
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    folders = [i for i in fs.get_file_info(pafs.FileSelector(parent)) if i.type == pafs.FileType.Directory]
    older = sorted(i.path for i in folders if i.base_name.startswith("checkpoint_") and i.base_name < name)
    return [latest, *(ray.train.Checkpoint(path, filesystem=fs) for path in reversed(older))]


def newest_whole(run_dir: Path) -> tuple[Path, int, int] | None:
    """(folder, step, bytes) of the newest whole checkpoint in a run's local storage folder."""
    for folder in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        if folder.is_dir() and damage(folder) is None:
            manifests = [json.loads(m.read_text())["files"] for m in folder.glob("manifest.rank*.json")]
            size = sum(f["bytes"] for files in manifests for f in files.values())
            return folder, json.loads((folder / "state.json").read_text())["step"], size
    return None

"""Fingerprints of what a stage reads (model directories, data files, the curated corpus), so that a
rerun knows whether its inputs changed: same fingerprint, resume; another one, start fresh.

A file's fingerprint hashes its size and 16 chunks of 64 KiB spread over it: rewriting a model or a
data file changes them (a retrain rewrites every tensor), while a 14 GB checkpoint is fingerprinted
by reading 1 MiB of it. A folder's is that of its files' fingerprints, names left out, so that a
Parquet folder rewritten with new file names but the same rows keeps its identity.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNKS, CHUNK = 16, 64 << 10


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= CHUNKS * CHUNK:
            h.update(f.read())
        else:
            for i in range(CHUNKS):
                f.seek(i * (size - CHUNK) // (CHUNKS - 1))
                h.update(f.read(CHUNK))
    return h.hexdigest()[:16]


def path_digest(path: str | Path) -> str:
    """A file's fingerprint, or a folder's (every file below it, links followed)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    files = sorted(file_digest(f) for f in path.rglob("*") if f.is_file())
    return hashlib.sha256(" ".join(files).encode()).hexdigest()[:16]

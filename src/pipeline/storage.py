"""Where runs live. `runs_dir` is a local path, an NFS/PVC mount, or a pyarrow.fs URI
(s3://bucket/runs, gs://..., hdfs://..., file:///...).

A stage always works on local files (models, tokenizers and Parquet are opened by libraries that
want paths), so with a URI the stages it reads are pulled into a local cache first and the stage it
writes is pushed back when it succeeds. Ray Train checkpoints go to the URI directly, so a worker on
any node can resume from them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.config import PipelineConfig

log = logging.getLogger("pipeline.storage")


def is_uri(location: str) -> bool:
    return "://" in location


def _exists(uri: str) -> bool:
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def pull(uri: str, local: Path) -> bool:
    if not _exists(uri):
        return False
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(uri, str(local.resolve()), destination_filesystem=pafs.LocalFileSystem())
    log.info("pulled %s -> %s", uri, local)
    return True


def push(local: Path, uri: str) -> None:
    """Replace the folder at `uri` with `local`; stale files from an earlier run do not survive."""
    fs, path = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    fs.create_dir(path)
    pafs.copy_files(str(local.resolve()), uri, source_filesystem=pafs.LocalFileSystem())
    log.info("pushed %s -> %s", local, uri)


def cache_dir(runs_uri: str) -> Path:
    root = Path(os.environ.get("PIPELINE_CACHE", "~/.cache/llm-pipeline")).expanduser()
    return root / hashlib.sha256(runs_uri.encode()).hexdigest()[:16]


@contextmanager
def staged(cfg: PipelineConfig, reads: list[str], writes: list[str]) -> Iterator[PipelineConfig]:
    """Yield the config the stages should run with: `cfg` itself for a local runs_dir; for a URI,
    a copy on a local cache holding the stages in `reads`, whose `writes` are pushed on success."""
    if not is_uri(cfg.runs_dir):
        yield cfg
        return
    remote = cfg.runs_dir.rstrip("/") + "/" + cfg.name
    local = cfg.model_copy(deep=True)
    local.runs_dir = str(cache_dir(cfg.runs_dir))
    local.train.checkpoint_uri = local.train.checkpoint_uri or remote
    for stage in reads:
        pull(f"{remote}/{stage}", local.stage_dir(stage))
    yield local
    for stage in writes:
        if local.stage_dir(stage).is_dir():
            push(local.stage_dir(stage), f"{remote}/{stage}")

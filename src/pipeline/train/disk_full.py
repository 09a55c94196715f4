"""A disk that fills up during training, said plainly. A bare "[Errno 28] No space left on device"
names neither the disk nor what to do; the error raised instead says where, how much is free, how much
a checkpoint of this run takes, and which checkpoint is whole to resume from once space is freed."""

from __future__ import annotations

import errno
import functools
from pathlib import Path

import ray.train

from pipeline.runtime import free_bytes
from pipeline.train.checkpoint_manifest import newest_whole

MIB = 2**20


def disk_full(error: OSError, output_dir: str) -> OSError:
    storage = ray.train.get_context().get_storage()
    local = storage.storage_filesystem.type_name == "local"
    run_dir = Path(storage.experiment_fs_path) if local else None
    where = Path(error.filename or run_dir or output_dir)
    kept = run_dir and newest_whole(run_dir)
    if kept:
        folder, step, size = kept
        then = (
            f"a checkpoint of this run takes {size / MIB:.1f} MiB; {folder.name} (step {step}) is whole and kept: "
            "free space, then run the same command to resume from it"
        )
    else:
        then = "no checkpoint of this run was written yet"
    free = free_bytes(where) / MIB
    return OSError(errno.ENOSPC, f"no space left on the disk of {where} ({free:.1f} MiB free); {then}")


def explain_disk_full(loop):
    """Wraps the training loop: a full disk anywhere in it is re-raised with `disk_full`'s message."""

    @functools.wraps(loop)
    def run(config) -> None:
        try:
            loop(config)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise disk_full(e, config.output_dir) from e

    return run

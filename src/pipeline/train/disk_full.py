"""A disk that fills up during training, said plainly. A bare "[Errno 28] No space left on device"
names neither the disk nor what to do; the error raised instead says where, how much is free, how much
a checkpoint of this run takes, and which checkpoint is whole to resume from once space is freed.
It is raised by the driver, which sees the failure wherever it happened: in a worker (a checkpoint,
TensorBoard) or in Ray Train's controller (its record of the checkpoints)."""

from __future__ import annotations

import errno
from pathlib import Path

from pipeline.runtime import free_bytes
from pipeline.train.checkpoint_manifest import newest_whole

MIB = 2**20


def explain(error: OSError, run_dir: Path | None, out: Path) -> OSError:
    """`run_dir`: the Ray Train run's checkpoint folder when it is on a local disk, else None."""
    where = Path(error.filename or run_dir or out)
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

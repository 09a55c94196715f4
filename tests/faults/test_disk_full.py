"""A disk that fills up: runs_dir on a size-limited tmpfs. A checkpoint write that runs out of space
fails with an error naming the storage path and the space the checkpoint needed; the checkpoint before
it stays loadable and a rerun after space is freed resumes from it. Curate's output on a full disk
leaves nothing that looks complete. Needs root (to mount the tmpfs)."""

import contextlib
import json
import os
import subprocess
import threading
import time

import pytest

from conftest import derived_config, tiny_curate

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@contextlib.contextmanager
def small_disk(path, megabytes: int):
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)]
    mounted = subprocess.run(command, capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path, leave_bytes: int):
    """Take all but `leave_bytes` of the disk at `path` with one file."""
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    filler = path / "filler"
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave_bytes, 0))
    return filler


def registered_checkpoint(storage) -> bool:
    """A checkpoint is on disk and Ray Train's controller has recorded it (the disk is filled after
    that: a record cut off mid-write is Ray's own file, and how a resume reads one is not tested here)."""
    written = [p.parent.name for p in storage.glob("*/checkpoint_2*/state.json")]
    records = list(storage.glob("*/checkpoint_manager_snapshot.json"))
    return bool(written and records) and written[0] in records[0].read_text()


def test_a_checkpoint_write_on_a_full_disk_names_the_path_and_a_rerun_resumes(tiny_run, tmp_path):
    from pipeline.cli import describe
    from pipeline.train.checkpoint_manifest import newest_whole
    from pipeline.train.stage import run_train

    with small_disk(tmp_path / "disk", 256) as disk:
        steps = ("train.max_steps=40", "train.checkpoint_every=10", "train.log_every=1", "train.eval_every=100")
        cfg = derived_config(tiny_run, disk, *steps)
        out = cfg.stage_dir("train") / "pretrain"
        failure = {}

        def train():
            try:
                run_train(cfg)
            except Exception as e:  # noqa: BLE001 - the test asserts on it
                failure["error"] = e

        runner = threading.Thread(target=train)
        runner.start()
        while not registered_checkpoint(out / "ray"):
            assert runner.is_alive(), f"training ended before its first checkpoint: {failure}"
            time.sleep(0.05)
        filler = fill(disk, 64 * 1024)  # the next checkpoint (4.4 MiB) cannot be written
        runner.join(timeout=600)
        assert "error" in failure, "training finished on a full disk"
        message = describe(failure["error"])
        [run_dir] = out.glob("ray/*-*")
        kept, kept_step, size = newest_whole(run_dir)
        print(f"\nFIGURE disk full during training: {message}")
        assert message.startswith("[Errno 28] no space left on the disk of " + str(disk))
        assert f"a checkpoint of this run takes {size / 2**20:.1f} MiB; {kept.name} (step {kept_step})" in message

        filler.unlink()
        run_train(cfg)
        state = json.loads((out / "final" / "state.json").read_text())
        print(f"FIGURE after freeing space: resumed from step {state['resumed_at']}, finished at step {state['step']}")
        assert state["resumed_at"] == [kept_step] and state["step"] == 40


def test_curate_on_a_full_disk_leaves_nothing_that_looks_complete(tiny_corpus, tmp_path):
    with small_disk(tmp_path / "disk", 8) as disk:
        fill(disk, 16 * 1024)
        out = tiny_curate(disk / "runs", tiny_corpus)
        error = out.stderr.strip().splitlines()[-1]
        print(f"\nFIGURE disk full during curate: exit {out.returncode}, {error}")
        runs = disk / "runs" / "tiny"
        assert out.returncode == 2  # (Ray Data logs its task's traceback above; the CLI's own error is one line)
        assert error.startswith(f"pipeline curate: error: [Errno 28] no space left on the disk of {runs} while writing")
        assert not (runs / "curate").exists() and not (runs / "curate.tmp").exists()

"""A process killed while torch loads one of DeepSpeed's JIT-built ops leaves the op's build lock behind,
and torch's next loader waits on it forever, without a word. A training worker's loads of DeepSpeed's ops
first remove a lock that no living process holds (train/jit_ops.py). Figure: how long that start took,
against a plain DeepSpeed load still waiting when the test gives up on it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_lock_holder

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SRC = Path(__file__).resolve().parents[2] / "src"
BUILDER = (
    "from deepspeed.accelerator import get_accelerator\n"
    "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
)
FOLDER = (
    f"{BUILDER}from torch.utils.cpp_extension import _get_build_directory\nprint(_get_build_directory(b.name, False))"
)


def python(code: str, env: dict, timeout: float, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout, check=True
    )


def test_a_lock_left_by_a_killed_loader_does_not_hang_the_next_deepspeed_start(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(SRC)}
    env.pop("TORCH_EXTENSIONS_DIR", None)
    built = Path(python(FOLDER, env, 120).stdout.strip())  # this machine's, if a run has built the op
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    folder = Path(python(FOLDER, env, 120).stdout.strip())
    if (built / "build.ninja").exists():  # spares a compile: the sources and flags are the same
        shutil.copytree(built, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock", "*.flock"))

    loader = build_lock_holder(folder / "lock", env)
    os.kill(loader.pid, signal.SIGKILL)
    loader.wait()
    assert (folder / "lock").exists()

    with pytest.raises(subprocess.TimeoutExpired) as plain:  # what every DeepSpeed start did before
        python(f"{BUILDER}print('loading', flush=True)\nb.load()", env, 30)
    said = plain.value.stdout or b""
    assert "loading" in (said.decode() if isinstance(said, bytes) else said)  # it got as far as the load
    assert (folder / "lock").exists()

    start = time.perf_counter()
    guarded = f"from pipeline.train.jit_ops import guard_op_loads\nguard_op_loads()\n{BUILDER}b.load()\nprint(b.name)"
    ours = python(guarded, env, 600)  # as a training worker does: the guard, then DeepSpeed's own load
    seconds = time.perf_counter() - start
    print(f"\nFIGURE after a killed loader: a plain DeepSpeed load still waited after 30 s; ours took {seconds:.1f} s")
    assert ours.stdout.strip().splitlines()[-1] == "deepspeed_shm_comm"
    assert f"removed {folder / 'lock'}: a process died while loading" in ours.stderr
    assert not (folder / "lock").exists()
    again = python(f"{BUILDER}b.load()\nprint('loaded')", env, 600)  # and DeepSpeed's own loads work again
    assert again.stdout.strip().endswith("loaded")

"""The whole `pipeline run` process tree (the driver and the local Ray it started) SIGKILLed in the
middle of training, then the same command again: curate is not redone, training resumes from its last
checkpoint (steps repeated at most one checkpoint interval), the repeated steps give the losses the
killed run logged, and the run goes on to quantize and serve. Figures: the steps repeated, and the
largest loss difference on them."""

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, TINY, free_port, logged_losses

pytestmark = [pytest.mark.faults, pytest.mark.integration]

INTERVAL, STEPS = 15, 40


def kill_tree(pid: int) -> int:
    """SIGKILL a process and everything it started; returns how many processes that was."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended on its own meanwhile
            p.kill()
    psutil.wait_procs(tree, timeout=30)
    return len(tree)


def test_a_sigkilled_pipeline_run_resumes_where_it_died(tiny_corpus, tmp_path):
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "--config",
        str(TINY),
        f"runs_dir={tmp_path}",
        f"data.input=[{tiny_corpus}/*.jsonl]",
        f"serve.port={free_port()}",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={INTERVAL}",
        "train.log_every=1",
        "train.eval_every=100",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's run
    train = tmp_path / "tiny" / "train"
    with (tmp_path / "killed.log").open("w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while max(logged_losses(train / "pretrain" / "tensorboard"), default=0) < INTERVAL + 5:
            assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        killed = kill_tree(first.pid)
    before = logged_losses(train / "pretrain" / "tensorboard")
    killed_at = max(before)
    assert not (train / "done.json").exists()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "curate: done earlier with these settings and inputs, skipped" in again.stdout
    state = json.loads((train / "pretrain" / "final" / "state.json").read_text())
    [resumed] = state["resumed_at"]
    repeated = killed_at - resumed
    replayed = {h["step"]: h["loss"] for h in state["history"] if resumed < h["step"] <= killed_at}
    worst = max(abs(replayed[s] - before[s]) / before[s] for s in replayed)
    print(
        f"\nFIGURE pipeline run SIGKILLed ({killed} processes) at step {killed_at}: rerun skipped curate, resumed "
        f"from step {resumed} ({repeated} steps repeated, interval {INTERVAL}); repeated steps' loss within "
        f"{worst:.2%} of the killed run's"
    )
    assert f"train/pretrain: resuming from step {resumed} of {STEPS}" in again.stdout
    assert 0 < repeated <= INTERVAL and state["step"] == STEPS
    assert worst < 0.05
    assert (train / "done.json").exists() and (tmp_path / "tiny" / "quantize" / "done.json").exists()
    assert "POST http://127.0.0.1" in again.stdout  # served and answered

    # the terminal gets the stages' lines; Ray's workers and Serve write to the run's logs
    shown = again.stdout + again.stderr
    lines = [line for line in shown.splitlines() if "%|" not in line]  # a bar redraws one line (\r, read as \n)
    assert len(lines) < 40 and "RayTrainWorker" not in shown, shown
    logs = tmp_path / "tiny" / "logs"
    assert "RayTrainWorker" in (logs / "train.log").read_text()
    assert "ServeController" in (logs / "serve.log").read_text()
    assert f"logs: ray.log, train.log, quantize.log, serve.log in {logs}" in again.stdout

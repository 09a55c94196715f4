"""A training worker process killed with SIGKILL mid-run (found by its process title): Ray Train
restarts the worker group, which resumes from the last checkpoint. Figure: steps repeated, at most
one checkpoint interval."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from conftest import derived_config, logged_losses

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_a_sigkilled_training_worker_resumes_from_its_last_checkpoint(tiny_run, tmp_path):
    from pipeline.train.stage import run_train

    interval = 5
    cfg = derived_config(
        tiny_run,
        tmp_path,
        "train.max_steps=25",
        f"train.checkpoint_every={interval}",
        "train.log_every=1",
        "train.eval_every=100",
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_train(cfg)))
    runner.start()
    tensorboard = cfg.stage_dir("train") / "pretrain" / "tensorboard"
    while max(logged_losses(tensorboard), default=0) < 8:  # past the step-5 checkpoint
        assert runner.is_alive(), "training ended before the worker could be killed"
        time.sleep(0.5)
    # Ray titles a worker's process ray::RayTrainWorker (the state API would need the dashboard)
    workers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker")
    ]
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    killed_at = max(logged_losses(tensorboard))
    runner.join(timeout=600)
    assert result, "the run did not complete after the kill"

    state = json.loads((cfg.stage_dir("train") / "final" / "state.json").read_text())
    assert state["step"] == 25 and len(state["resumed_at"]) == 1
    repeated = killed_at - state["resumed_at"][0]
    print(
        f"\nFIGURE train worker SIGKILL at step {killed_at}: resumed from step {state['resumed_at'][0]}, "
        f"{repeated} steps repeated (checkpoint interval {interval})"
    )
    assert 0 <= repeated <= interval
    assert [h["step"] for h in state["history"]][-1] == 25

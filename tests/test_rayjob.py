"""`ray job submit` against a real Ray head started here (ray start --head on free ports)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from ray.job_submission import JobSubmissionClient

from conftest import REPO, derived_config, free_port
from pipeline.train.fit import step_reached

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TOKEN = Path("~/.ray/auth_token").expanduser()  # written by the head (Ray 2.60 turns token auth on)
# what these tests check is the job mechanics, not training: short runs (the gate has its own tests)
QUICK = ["train.max_steps=6", "train.checkpoint_every=3", "quantize.calib_samples=4", "quantize.max_ppl_increase=1.0"]


def _env() -> dict:
    # token auth is on by default in Ray 2.60; the CLI only sends the token when asked to
    # the head is a 2-CPU cluster: Ray Data's Parquet footer pool sized for it, as a local Ray is (runtime.py)
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    }


def start_head() -> tuple[str, subprocess.Popen]:
    """A Ray head of its own (its own ports and temp dir) in its own process group: its dashboard's address."""
    dash = free_port()
    temp = Path(f"/tmp/rj-{uuid.uuid4().hex[:6]}")  # Ray's socket paths must stay short
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--temp-dir={temp}",
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while (
        subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=_env(), capture_output=True
        ).returncode
        != 0
    ):
        assert proc.poll() is None and time.time() < deadline, "ray head did not come up"
        time.sleep(2)
    return address, proc


def stop_head(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the head takes its processes down with it
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a graceful stop waits ~30 s on idle workers; nothing here needs it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def head():
    address, proc = start_head()
    yield address
    stop_head(proc)


def submit(address: str, *entrypoint: str, timeout_s: int = 600) -> tuple[str, str]:
    return wait_for(address, start_job(address, *entrypoint), timeout_s)


def start_job(address: str, *entrypoint: str) -> str:
    job_id = f"test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--submission-id",
            job_id,
            "--no-wait",
            "--",
            *entrypoint,
        ],
        env=_env(),
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return job_id


def wait_for(address: str, job_id: str, timeout_s: int = 600) -> tuple[str, str]:
    # wait in-process: a `ray job status` per poll is a Python start-up that takes the job's CPU
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {TOKEN.read_text().strip()}"})
    deadline = time.time() + timeout_s
    while not client.get_job_status(job_id).is_terminal() and time.time() < deadline:
        time.sleep(1)
    out = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, job_id], env=_env(), capture_output=True, text=True
    )
    # `ray job status` ends with "Job '<id>' succeeded" (or failed / stopped) once the job is over
    found = re.search(r"Job '[^']+' (succeeded|failed|stopped)", out.stdout + out.stderr)
    status = found.group(1).upper() if found else None
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, job_id], env=_env(), capture_output=True, text=True
    ).stdout
    return status or "TIMEOUT", logs


def test_failing_job_reports_failed_with_our_message(head, tmp_path):
    status, logs = submit(
        head, "python", "rayjobs/quantize.py", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", timeout_s=300
    )
    assert status == "FAILED"
    assert "run `pipeline train` first" in logs


def test_the_consoles_launch_submits_a_ray_job_that_shows_up_under_runs(head, tiny_corpus, tmp_path):
    from pipeline.console.launch import Launcher
    from pipeline.console.runs import list_runs

    launcher = Launcher(tmp_path, ray_jobs=True, address=head)
    job = launcher.start("curate", str(REPO / "configs" / "tiny.yaml"), [f"data.input=[{tiny_corpus}/*.jsonl]"])
    deadline = time.time() + 300
    while launcher.status(job) in ("PENDING", "RUNNING") and time.time() < deadline:
        time.sleep(1)
    logs = launcher.logs(job)
    assert launcher.status(job) == "SUCCEEDED", logs
    assert re.search(r"curate: \d+ in, \d+ kept", logs) and "\r" not in logs
    (run,) = list_runs(tmp_path)
    assert (run.name, run.status, run.command, [s.name for s in run.stages]) == ("tiny", "done", "curate", ["curate"])


@pytest.mark.slow
def test_each_stage_runs_as_its_own_job_then_the_pipeline_job_skips_what_they_did(head, tiny_corpus, tmp_path):
    """The per-stage RayJobs of cluster/kuberay run these same entrypoints, one after another (distill,
    adapt and eval are the same five lines for another stage: test_cluster checks that each names its own,
    and their stages have in-process tests). The whole pipeline's job, submitted again over their outputs
    (a resubmitted job), redoes none of their stages and serves the model they made."""
    common = [
        "--config",
        "configs/tiny.yaml",
        f"runs_dir={tmp_path}",
        f"data.input=[{tiny_corpus}/*.jsonl]",
        *QUICK,
        "quantize.enabled=false",  # AWQ has its own tests (tests/test_stages.py, the README walkthrough)
    ]
    outputs = {"curate": "stats.json", "train": "metrics.json", "quantize": "quant_report.json"}
    for stage, output in outputs.items():
        status, logs = submit(head, "python", f"rayjobs/{stage}.py", *common)
        assert status == "SUCCEEDED", (stage, logs[-3000:])
        assert (tmp_path / "tiny" / stage / output).is_file(), stage
        assert f"{stage} outputs: {tmp_path}/tiny/{stage}" in logs

    status, logs = submit(head, "python", "rayjobs/pipeline.py", *common, f"serve.port={free_port()}")
    # on a cluster the endpoint outlives the job; take it down so the next jobs get the head's CPUs
    subprocess.run([str(BIN / "serve"), "shutdown", "-a", head, "-y"], env=_env(), capture_output=True, timeout=120)
    assert status == "SUCCEEDED", logs[-3000:]
    for stage in ("curate", "train", "quantize"):
        assert f"{stage}: done earlier with these settings and inputs, skipped" in logs, stage
    assert (tmp_path / "tiny" / "train" / "final" / "model" / "adapter_config.json").is_file()
    assert "POST http://127.0.0.1" in logs and "/generate" in logs


def kill_head(proc: subprocess.Popen) -> None:
    """SIGKILL everything of a head at once, as when its pod dies: its process group (gcs, raylet,
    dashboard) and every process it started, the Ray workers and the job's driver among them, which run
    in sessions of their own (Ray Train's workers outlived the group's kill by two steps and a checkpoint)."""
    started = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=30)


@pytest.mark.faults
def test_a_training_job_resumes_from_its_checkpoint_after_its_head_is_killed_and_restarted(tiny_run, tmp_path):
    """#21: the head (and with it the job's driver and workers) SIGKILLed mid-training, a new head started,
    the same job submitted again: training resumes from the last checkpoint in runs_dir storage."""
    cfg = derived_config(tiny_run, tmp_path)  # the job trains on tiny_run's curated data, copied
    job = ["python", "rayjobs/train.py", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}"]
    job += [f"data.input={cfg.data.input}", "train.max_steps=25", "train.checkpoint_every=5", "train.log_every=1"]
    address, proc = start_head()
    try:
        job_id = start_job(address, *job)
        progress = cfg.stage_dir("train") / "pretrain"
        deadline = time.time() + 600
        while (step_reached(progress) or 0) < 8:  # past the step-5 checkpoint
            assert time.time() < deadline, wait_for(address, job_id, 1)[1][-3000:]
            time.sleep(0.5)
        kill_head(proc)
        killed_at = step_reached(progress)  # the last step logged before every process of the head was gone
    finally:
        if proc.poll() is None:
            stop_head(proc)
    address, proc = start_head()
    try:
        status, logs = wait_for(address, start_job(address, *job))
    finally:
        stop_head(proc)
    assert status == "SUCCEEDED", logs[-3000:]
    state = json.loads((cfg.stage_dir("train") / "final" / "state.json").read_text())
    repeated = killed_at - state["resumed_at"][0]
    print(
        f"\nFIGURE head SIGKILLed at training step {killed_at}, new head, job resubmitted: resumed from step "
        f"{state['resumed_at'][0]}, {repeated} steps repeated (checkpoint interval 5); finished {state['step']}"
    )
    assert state["step"] == 25 and 0 <= repeated <= 5

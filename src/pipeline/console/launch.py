"""Start, follow and stop a stage or a whole run from the console: as a local process (no RAY_ADDRESS),
or as a Ray job on the cluster in RAY_ADDRESS (Ray Jobs SDK). Both run the same rayjobs/<stage>.py
entrypoint that `ray job submit` runs, so a launched stage writes its journal and logs like any other."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RAYJOBS = Path(__file__).resolve().parents[3] / "rayjobs"  # src/pipeline/console/ -> the repository
# what the Launch page offers: the CLI's command and its rayjobs/ entrypoint
COMMANDS = {
    "run": "pipeline",
    "curate": "curate",
    "train": "train",
    "quantize": "quantize",
    "distill": "distill",
    "adapt": "adapt",
    "eval": "eval",
}


@dataclass
class Job:
    id: str
    command: str
    argv: list[str]
    started: float
    where: str  # "local" or the Ray address
    process: subprocess.Popen | None = None
    log: Path | None = None
    stopped: bool = False  # stop() was asked for


def entrypoint(command: str, config: str, overrides: list[str]) -> list[str]:
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ValueError(f"overrides are key.sub=value, not {', '.join(bad)}")
    return [str(RAYJOBS / f"{COMMANDS[command]}.py"), "--config", config, *overrides]


def _ray_headers() -> dict:
    """Ray's token authentication: the token `ray start` wrote, as `ray job submit` sends it."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}


class Launcher:
    """The jobs this console started: local processes, or Ray jobs (`ray_jobs`) submitted to the dashboard
    at `address` (None: the one of the cluster this process is connected to). `runs_dir` is passed to each
    as an override, so that what it writes shows up under Runs."""

    def __init__(self, runs_dir: Path, ray_jobs: bool = False, address: str | None = None):
        self.runs_dir, self.ray_jobs, self.address = runs_dir, ray_jobs, address
        self.jobs: dict[str, Job] = {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address, headers=_ray_headers())
        return self._client

    def start(self, command: str, config: str, overrides: list[str]) -> Job:
        argv = entrypoint(command, config, [f"runs_dir={self.runs_dir}", *overrides])
        where = (self.address or "this Ray cluster") if self.ray_jobs else "local"
        job = Job(f"{command}-{uuid.uuid4().hex[:8]}", command, argv, time.time(), where)
        if self.ray_jobs:
            self.client.submit_job(entrypoint=" ".join(["python", *argv]), submission_id=job.id)
        else:
            job.log = self.runs_dir / ".console" / f"{job.id}.log"
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with job.log.open("wb") as out:  # its own session: stop() ends it and everything it started
                job.process = subprocess.Popen(
                    [sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        self.jobs[job.id] = job
        return job

    def status(self, job: Job) -> str:
        """RUNNING, SUCCEEDED, FAILED or STOPPED (Ray's words for a local process too)."""
        if self.ray_jobs:
            return str(self.client.get_job_status(job.id).value)
        code = job.process.poll()
        if code is None:
            return "RUNNING"
        return "SUCCEEDED" if code == 0 else "STOPPED" if job.stopped or code < 0 else "FAILED"

    def logs(self, job: Job) -> str:
        """What the job printed, with progress bars as a terminal shows them: their last state, not
        every redraw (tqdm redraws a line after a carriage return)."""
        text = self.client.get_job_logs(job.id) if self.ray_jobs else job.log.read_bytes().decode(errors="replace")
        return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))

    def stop(self, job: Job) -> None:
        """Ctrl-C to the command alone (the CLI records the run as interrupted and stops its Ray), then, after
        it ends or 20 s, a kill of whatever it started and left."""
        if self.ray_jobs:
            self.client.stop_job(job.id)
            return
        if job.process.poll() is not None:
            return
        job.stopped = True
        job.process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.process.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.process.pid, signal.SIGKILL)
        job.process.wait()

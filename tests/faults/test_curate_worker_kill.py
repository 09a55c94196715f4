"""Curation with a Ray Data worker process SIGKILLed while it runs a task: Ray retries the task, and
the output is identical to the undisturbed run's (same kept ids, same rejects and reasons), with every
input record accounted for. Figure: records in = kept + rejected on the disturbed run."""

import threading
import time

import psutil
import pytest

from conftest import is_data_task, outcome_difference
from pipeline.curate.stage import run_curate

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def busy_data_worker() -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if is_data_task(title):
            return proc
    return None


def test_a_killed_curate_worker_changes_nothing(tiny_run, tmp_path):
    out, result, killed = tmp_path / "curate", {}, []
    runner = threading.Thread(target=lambda: result.update(run_curate(tiny_run, out_dir=out)))
    runner.start()
    while runner.is_alive() and not killed:
        proc = busy_data_worker()
        if proc:
            title = " ".join(proc.cmdline()).strip().removeprefix("ray::")
            proc.kill()  # SIGKILL
            killed.append(title)
        time.sleep(0.01)
    runner.join(timeout=600)
    assert killed, "the run ended before a task could be killed"
    print(
        f"\nFIGURE curate worker SIGKILL during {killed[0]}: {result['docs_in']} in = {result['kept']} kept "
        f"+ {result['rejected']} rejected; output identical to the undisturbed run"
    )
    assert result["docs_in"] == result["kept"] + result["rejected"]
    assert outcome_difference(out, tiny_run.stage_dir("curate")) == {}

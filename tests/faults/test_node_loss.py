"""Losing a worker node (#21): a three-node Ray cluster on this machine, one non-head node killed
(its raylet and everything it started, SIGKILL) while it curates, trains or serves, and a node of the
same size added 5 s later (node_loss_drill.py runs each in its own process). Figures: records
accounted for; steps repeated after the restart; failed requests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import outcome_difference

pytestmark = [pytest.mark.faults, pytest.mark.integration]
DRILL = Path(__file__).with_name("node_loss_drill.py")


def drill(scenario: str, runs: Path, corpus: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(DRILL), scenario, str(runs), str(corpus)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("DRILL ")), None)
    assert line, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    result = json.loads(line.removeprefix("DRILL "))
    assert result.get("killed_while"), f"the work ended before a node could be killed: {result}"
    return result


def test_curation_loses_a_node_and_every_record_is_still_kept_or_rejected_once(tiny_run, tiny_corpus, tmp_path):
    result = drill("curate", tmp_path, tiny_corpus)
    print(
        f"\nFIGURE node lost during curate ({result['killed_while']}): {result['docs_in']} in = "
        f"{result['kept']} kept + {result['rejected']} rejected; output identical to the undisturbed run"
    )
    assert not result.get("error"), result
    assert result["docs_in"] == result["kept"] + result["rejected"]
    assert outcome_difference(tmp_path / "tiny" / "curate", tiny_run.stage_dir("curate")) == {}


def test_training_loses_a_node_and_resumes_from_its_checkpoint_once_a_node_returns(tiny_corpus, tmp_path):
    result = drill("train", tmp_path, tiny_corpus)
    assert not result.get("error"), result
    resumed = result["resumed_at"]
    repeated = result["step_at_kill"] - resumed[0]
    print(
        f"\nFIGURE node lost at training step {result['step_at_kill']} (a worker on it): resumed from step "
        f"{resumed[0]} once a node joined, {repeated} steps repeated (checkpoint interval 5); finished "
        f"{result['step']} steps"
    )
    assert result["step"] == 25 and len(resumed) >= 1
    assert 0 <= repeated <= 5


def test_serving_loses_a_node_under_load_and_requests_fail_over(tiny_run, tiny_corpus, tmp_path):
    result = drill("serve", tiny_run.runs_dir, tiny_corpus)  # serves what tiny_run quantized
    print(
        f"\nFIGURE node lost under load (a model replica on it): {result['failed']} failed of "
        f"{result['requests']} ({result['failed_by_status']}); p50 {result['latency_p50_s']} s, max "
        f"{result['latency_max_s']} s; {result['failed_after_replacement']} failed of the "
        f"{result['requests_after_replacement']} sent after the node was replaced"
    )
    # only requests an ingress replica on the lost node held (8 clients: one each), or was handed in the
    # moment before the proxy saw it die, may fail; runs here lost 0, 2 and 4
    assert result["failed"] <= 2 * 8
    assert result["requests_after_replacement"] and not result["failed_after_replacement"]

"""bench/gpu_check.sh, the one prepared GPU check, in its CPU dry run (tiny shapes, one run of each code
path: the plain loop, ZeRO-2 and FSDP2 with the fused cross-entropy, both model shapes, the serving
engine with batching off and on, AWQ against 16-bit), so the script never rots between GPU sessions."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_the_gpu_check_dry_run_measures_every_section(tmp_path):
    # compile is left out here (its own test compares it with the plain loss): it would double the time
    out = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--no-compile"],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["errors"] == {} and report["skipped"] == []
    dense = report["train"]["dense"]["runs"]
    assert set(dense) == {"plain", "plain+switches"}  # the GPU run adds zero2 and fsdp2 (the Ray Train path below)
    assert all(run["tokens_per_s"] > 0 and run["mfu"] >= 0 for run in dense.values())  # tiny: MFU rounds to 0
    assert dense["plain"]["cross_entropy"] == "full_logits" and dense["plain+switches"]["cross_entropy"] == "chunked"
    assert all(run["attention"] == "sdpa" for run in dense.values())
    moe = report["train"]["moe"]
    assert moe["active_parameters"] < moe["parameters"]
    ray_run = moe["runs"]["fsdp2+fused_ce"]
    assert ray_run["tokens_per_s"] > 0 and ray_run["cross_entropy"] == "chunked" and ray_run["peak_rss_gib"] > 0
    serving = report["serving"]
    assert serving["batching_off"]["mean_batch"] == 1 and serving["batching_on"]["requests"] > 0
    assert report["awq"]["tokens_per_s"]["awq_w4a16"] > 0 and report["awq"]["bytes"]["awq_w4a16"] > 0

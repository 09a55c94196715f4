import subprocess
import sys

import pytest

from conftest import REPO

PIPELINE = [sys.executable, "-m", "pipeline.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PIPELINE, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_help_lists_every_stage_and_examples():
    out = run("--help")
    assert out.returncode == 0
    for stage in ("sample-data", "curate", "train", "quantize", "distill", "serve", "run"):
        assert stage in out.stdout
    assert "RAY_ADDRESS" in out.stdout and "examples" in out.stdout


def test_stage_help_shows_config_and_overrides():
    out = run("curate", "--help")
    assert out.returncode == 0
    assert "--config" in out.stdout and "--input" in out.stdout and "key.sub=value" in out.stdout


def test_bad_config_key_is_a_clear_error_without_traceback():
    out = run("train", "train.warmup=3")
    assert out.returncode == 2
    assert "train.warmup: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration  # the stage starts a local Ray before it finds nothing to quantize
def test_missing_previous_stage_is_a_clear_error(tmp_path):
    out = run("quantize", f"runs_dir={tmp_path}")
    assert out.returncode == 2
    assert "run `pipeline train` first" in out.stderr

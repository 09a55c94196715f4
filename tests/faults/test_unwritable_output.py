"""An output directory that cannot be written: a clear error naming the path, no traceback, and no
half-written stage folder left looking complete (stages write to <stage>.tmp and rename on success)."""

import pytest

from conftest import tiny_curate

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_unwritable_runs_dir_is_a_clear_error_naming_the_path(tmp_path, tiny_corpus):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the runs folder should be")
    out = tiny_curate(blocker / "runs", tiny_corpus)
    print(f"\nFIGURE unwritable output: exit {out.returncode}, stderr: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 2
    assert "pipeline curate: error:" in out.stderr and str(blocker) in out.stderr
    assert "Traceback" not in out.stderr


def test_a_failing_stage_leaves_no_output_that_looks_complete(tmp_path):
    from pipeline.runtime import atomic_dir

    final = tmp_path / "curate"
    with pytest.raises(OSError), atomic_dir(final) as tmp:
        (tmp / "kept").mkdir()
        (tmp / "kept" / "part-0.parquet").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(tmp / "kept" / "part-1.parquet"))
    assert not final.exists() and not (tmp_path / "curate.tmp").exists()

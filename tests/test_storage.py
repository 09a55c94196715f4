"""A URI runs_dir (here file://, the same pyarrow.fs code path as s3://): stages pull what they
read into a local cache, push what they write, and Ray Train checkpoints go to the URI itself."""

import json
import shutil

import pyarrow.fs as pafs
import pytest

from conftest import TINY
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.storage import cache_dir, staged


@pytest.mark.integration
def test_stages_hand_over_through_a_uri(ray_local, tiny_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket"
    uri = f"file://{remote}/runs"
    common = ["--config", str(TINY), f"runs_dir={uri}", f"data.input=[{tiny_corpus}/*.jsonl]"]
    assert main(["curate", *common]) == 0
    assert f"curate outputs: {uri}/tiny/curate" in capsys.readouterr().out
    stats = json.loads((remote / "runs" / "tiny" / "curate" / "stats.json").read_text())
    assert stats["kept"] > 0 and list((remote / "runs" / "tiny" / "curate" / "kept").glob("*.parquet"))

    shutil.rmtree(tmp_path / "cache")  # a fresh node: train must pull the curated data from the URI
    assert main(["train", *common, "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2"]) == 0
    train = remote / "runs" / "tiny" / "train"
    metrics = json.loads((train / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert (train / "final" / "model" / "adapter_config.json").is_file()
    checkpoints = list((remote / "runs" / "tiny" / "checkpoints" / "train").rglob("checkpoint_*"))
    assert checkpoints, "Ray Train wrote its checkpoints to the URI, not to the local cache"


def test_a_stage_that_fails_pushes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/bucket"
    cfg = load_config(TINY, [f"runs_dir={uri}"])
    try:
        with staged(cfg, reads=["curate"], writes=["train"]) as local:
            assert local.runs_dir == str(cache_dir(uri)) and local.train.checkpoint_uri == f"{uri}/tiny"
            local.stage_dir("train").mkdir(parents=True)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    fs, path = pafs.FileSystem.from_uri(uri)
    assert fs.get_file_info(f"{path}/tiny/train").type == pafs.FileType.NotFound


def test_a_local_runs_dir_is_used_in_place(tmp_path):
    cfg = load_config(TINY, [f"runs_dir={tmp_path}"])
    with staged(cfg, reads=["curate"], writes=["train"]) as local:
        assert local is cfg


def test_a_full_disk_under_a_wrapped_error_is_reported_with_its_disk_and_the_partial_output_removed(tmp_path):
    """Ray Data raises a full disk inside its own error (retry advice, the cause chained): the stage's
    error names the disk and what was being written, and the partial <stage>.tmp is gone."""
    import errno

    from pipeline.runtime import atomic_dir, disk_full

    class TaskError(Exception):  # the shape of Ray's wrapper: the worker's exception in `.cause`
        def __init__(self, cause):
            super().__init__("Failed to apply UDF transform after 1/1 attempts")
            self.cause = cause

    full = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full(TaskError(full)) is full and disk_full(TaskError(OSError(errno.EACCES, "denied"))) is None
    with pytest.raises(OSError) as raised, atomic_dir(tmp_path / "curate") as tmp:
        (tmp / "part-0.parquet").write_bytes(b"half")
        raise TaskError(full)
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value).startswith(f"[Errno 28] no space left on the disk of {tmp_path} while writing curate (")
    assert not (tmp_path / "curate").exists() and not (tmp_path / "curate.tmp").exists()

"""The curate stage on a real sample of licence text, with planted bad and duplicate records."""
import json

import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from pipeline.curate.stage import run_curate


@pytest.fixture(scope="module")
def curated(ray_local, tiny_corpus, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), tiny_corpus)
    stats = run_curate(cfg)
    out = cfg.stage_dir("curate")
    kept = pq.read_table(out / "kept").to_pandas()
    rejected = pq.read_table(out / "rejected").to_pandas().set_index("id")
    return stats, kept, rejected, out


def input_lines(corpus) -> int:
    return sum(1 for f in corpus.glob("*.jsonl") for line in f.read_bytes().splitlines() if line.strip())


def test_nothing_is_lost(curated, tiny_corpus):
    stats, kept, rejected, _ = curated
    assert stats["docs_in"] == input_lines(tiny_corpus)
    assert len(kept) + len(rejected) == stats["docs_in"]
    assert stats["kept"] == len(kept) and stats["rejected"] == len(rejected)
    assert not set(kept["id"]) & set(rejected.index)


def test_bad_records_are_rejected_with_reasons(curated):
    _, _, rejected, _ = curated
    assert rejected.loc["planted-short", "reason"].startswith("too short")
    assert rejected.loc["planted-empty", "reason"] == "empty text"
    assert rejected.loc["planted-notext", "reason"] == "missing text field 'text'"
    bad_json = rejected[rejected["reason"].str.startswith("malformed json")]
    assert len(bad_json) == 1 and '"planted-bad-json"' in bad_json.iloc[0]["raw"]
    bad_utf8 = rejected[rejected["reason"] == "invalid utf-8"]
    assert len(bad_utf8) == 1 and "planted-bad-utf8" in bad_utf8.iloc[0]["raw"]


def test_exact_and_near_duplicates_point_to_a_kept_survivor(curated):
    _, kept, rejected, _ = curated
    assert rejected.loc["planted-exact-copy", "reason"] == "exact duplicate"
    assert rejected.loc["planted-near-copy", "reason"] == "near duplicate"
    dups = rejected[rejected["reason"].str.endswith("duplicate")]
    assert len(dups) > 10  # licence texts repeat across packages
    assert set(dups["duplicate_of"]) <= set(kept["id"])
    assert kept["text"].is_unique


def test_stats_file_counts_per_reason(curated):
    stats, _, _, out = curated
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert sum(stats["by_reason"].values()) == stats["docs_in"]
    assert stats["by_reason"]["exact duplicate"] >= 1 and stats["by_reason"]["near duplicate"] >= 1
    assert stats["docs_per_s"] > 0

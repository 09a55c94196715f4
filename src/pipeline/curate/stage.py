"""The curate stage: chains the steps, writes kept/ and rejected/ Parquet and stats.json."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import ray

from pipeline.config import PipelineConfig
from pipeline.curate.dedup_exact import exact_dedup
from pipeline.curate.dedup_fuzzy import fuzzy_dedup
from pipeline.curate.filters import MinWords, apply_filters
from pipeline.curate.normalize import normalize_batch
from pipeline.curate.read import expand_inputs, read_corpus
from pipeline.runtime import atomic_dir, cluster_cpus

log = logging.getLogger("pipeline.curate")

KEPT_COLUMNS = ["id", "text", "source"]
REJECTED_COLUMNS = ["id", "text", "raw", "source", "reason", "duplicate_of"]


class ConservationError(RuntimeError):
    """Input records != kept + rejected: something was lost, which must never pass silently."""


def _select(batch: pd.DataFrame, kept: bool, columns: list[str]) -> pd.DataFrame:
    return batch.loc[(batch["reason"] == "") == kept, columns]


def _reason_counts(ds: ray.data.Dataset) -> dict[str, int]:
    return {r["reason"] or "kept": r["count()"] for r in ds.groupby("reason").count().take_all()}


def run_curate(cfg: PipelineConfig, inputs: list[str] | None = None, out_dir: str | Path | None = None) -> dict:
    data = cfg.data
    out = Path(out_dir) if out_dir else cfg.stage_dir("curate")
    num_blocks = 2 * cluster_cpus()
    timings: dict[str, float] = {}

    t = time.time()
    files = expand_inputs(inputs or data.input)
    in_bytes = sum(Path(f).stat().st_size for f in files)
    ds = read_corpus(files, data.text_field, data.id_field)
    ds = ds.map_batches(normalize_batch, batch_format="pandas", fn_kwargs={"lowercase": data.lowercase})
    ds = ds.map_batches(apply_filters, batch_format="pandas", fn_kwargs={"filters": [MinWords(data.min_words)]})
    ds = ds.materialize()
    timings["read_normalize_filter"] = time.time() - t
    n_in = ds.count()

    if data.dedup.exact:
        t = time.time()
        ds = exact_dedup(ds, num_blocks).materialize()
        timings["exact_dedup"] = time.time() - t
    near = 0
    if data.dedup.fuzzy:
        t = time.time()
        d = data.dedup
        ds, near = fuzzy_dedup(ds, d.threshold, d.num_perm, d.ngram, num_blocks)
        ds = ds.materialize()
        timings["fuzzy_dedup"] = time.time() - t

    t = time.time()
    with atomic_dir(out) as tmp:
        ds.map_batches(_select, batch_format="pandas", fn_kwargs={"kept": True, "columns": KEPT_COLUMNS}) \
          .write_parquet(str(tmp / "kept"))
        ds.map_batches(_select, batch_format="pandas", fn_kwargs={"kept": False, "columns": REJECTED_COLUMNS}) \
          .write_parquet(str(tmp / "rejected"))
        (tmp / "rejected").mkdir(exist_ok=True)  # an all-kept run still has the folder
        (tmp / "kept").mkdir(exist_ok=True)
        counts = _reason_counts(ds)
        kept = counts.get("kept", 0)
        rejected = sum(v for k, v in counts.items() if k != "kept")
        if kept + rejected != n_in:
            raise ConservationError(f"{n_in} records in, but {kept} kept + {rejected} rejected")
        timings["write"] = time.time() - t
        total = sum(timings.values())
        stats = {
            "docs_in": n_in, "kept": kept, "rejected": rejected,
            "by_reason": dict(sorted(counts.items())), "near_duplicates": near,
            "input_mb": round(in_bytes / 1e6, 3), "seconds": {k: round(v, 2) for k, v in timings.items()},
            "docs_per_s": round(n_in / total, 1), "mb_per_s": round(in_bytes / 1e6 / total, 3),
            "dedup": data.dedup.model_dump(),
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("curate: %d in, %d kept, %d rejected -> %s", n_in, kept, rejected, out)
    return stats

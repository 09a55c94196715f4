"""The curate stage: chains the steps, writes kept/ and rejected/ Parquet, stats.json and a plot.

read -> normalize -> quality filters -> [perplexity] -> exact dedup -> fuzzy dedup -> [augment]
-> write. Every step only marks rows (a `reason` for the dropped ones); nothing is removed until
the end, where input = kept (less augmented rows) + rejected is checked.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import ray

from pipeline.config import DataConfig, PipelineConfig
from pipeline.curate.augment import augment
from pipeline.curate.dedup_exact import exact_dedup
from pipeline.curate.dedup_fuzzy import fuzzy_dedup
from pipeline.curate.filters import apply_filters, build_filters
from pipeline.curate.normalize import normalize_batch
from pipeline.curate.perplexity import PerplexityScorer
from pipeline.curate.read import ReadOptions, expand_inputs, read_corpus
from pipeline.plots import plot_histograms
from pipeline.runtime import atomic_dir

log = logging.getLogger("pipeline.curate")

KEPT_COLUMNS = ["id", "text", "source", "meta", "perplexity", "augmented_from"]
REJECTED_COLUMNS = ["id", "text", "raw", "source", "meta", "reason", "duplicate_of", "perplexity"]
# which step wrote a reason (the reasons themselves stay readable sentences)
STEP_OF_REASON = [("exact duplicate", "exact_dedup"), ("near duplicate", "fuzzy_dedup"),
                  ("perplexity", "perplexity"), ("empty after normalization", "normalize"),
                  ("too ", "filters"), ("repetitive", "filters"), ("symbol", "filters"),
                  ("alphabetic", "filters"), ("script", "filters")]


class ConservationError(RuntimeError):
    """Input records != kept + rejected: something was lost, which must never pass silently."""


def step_of(reason: str) -> str:
    return next((step for prefix, step in STEP_OF_REASON if reason.startswith(prefix)), "read")


def _select(batch: pd.DataFrame, kept: bool, columns: list[str]) -> pd.DataFrame:
    return batch.loc[(batch["reason"] == "") == kept, [c for c in columns if c in batch]]


def _reason_counts(ds: ray.data.Dataset) -> dict[str, int]:
    return {r["reason"] or "kept": r["count()"] for r in ds.groupby("reason").count().take_all()}


def _kept_profile(batch: pd.DataFrame) -> pd.DataFrame:
    """One small row per kept document: its length, perplexity and whether augmentation made it."""
    kept = batch[batch["reason"] == ""]
    out = pd.DataFrame({"words": [len(t.split()) for t in kept["text"]],
                        "augmented": (kept["augmented_from"] != "").tolist()}, index=kept.index)
    out["perplexity"] = kept["perplexity"] if "perplexity" in kept else float("nan")
    return out


def score_perplexity(ds: ray.data.Dataset, data: DataConfig) -> ray.data.Dataset:
    p = data.perplexity
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    return ds.map_batches(PerplexityScorer, batch_format="pandas", batch_size=p.batch_size,
                          concurrency=p.concurrency, num_gpus=1 if gpu else 0,
                          fn_constructor_kwargs={"model_path": p.model_path, "max_tokens": p.max_tokens,
                                                 "max_perplexity": p.max_perplexity})


def write_outputs(ds: ray.data.Dataset, tmp: Path, rows_per_shard: int) -> None:
    ds.map_batches(_select, batch_format="pandas", fn_kwargs={"kept": True, "columns": KEPT_COLUMNS}) \
      .write_parquet(str(tmp / "kept"), min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard)
    ds.map_batches(_select, batch_format="pandas", fn_kwargs={"kept": False, "columns": REJECTED_COLUMNS}) \
      .write_parquet(str(tmp / "rejected"))
    (tmp / "rejected").mkdir(exist_ok=True)  # an all-kept run still has the folder
    (tmp / "kept").mkdir(exist_ok=True)


def run_curate(cfg: PipelineConfig, inputs: list[str] | None = None, out_dir: str | Path | None = None) -> dict:
    data = cfg.data
    out = Path(out_dir) if out_dir else cfg.stage_dir("curate")
    timings: dict[str, float] = {}

    t = time.time()
    files = expand_inputs(inputs or data.input)
    in_bytes = sum(Path(f).stat().st_size for f in files)
    opts = ReadOptions(data.text_field, data.id_field, tuple(data.keep_fields), dict(data.rename))
    ds = read_corpus(files, opts)
    ds = ds.map_batches(normalize_batch, batch_format="pandas", fn_kwargs={"lowercase": data.lowercase})
    ds = ds.map_batches(apply_filters, batch_format="pandas", fn_kwargs={"filters": build_filters(data.filters)})
    ds = ds.materialize()
    timings["read_normalize_filter"] = time.time() - t
    n_in = ds.count()

    if data.perplexity.model_path:
        t = time.time()
        ds = score_perplexity(ds, data).materialize()
        timings["perplexity"] = time.time() - t
    if data.dedup.exact:
        t = time.time()
        ds = exact_dedup(ds).materialize()
        timings["exact_dedup"] = time.time() - t
    near = 0
    if data.dedup.fuzzy:
        t = time.time()
        ds, near = fuzzy_dedup(ds, data.dedup)
        ds = ds.materialize()
        timings["fuzzy_dedup"] = time.time() - t

    if data.augment.back_translation_models or data.augment.synonym_model:
        t = time.time()
        ds = augment(ds, data.augment).materialize()
        timings["augment"] = time.time() - t

    t = time.time()
    with atomic_dir(out) as tmp:
        rows_per_shard = max(1, int(data.shard_mb * 1e6 / max(in_bytes / max(n_in, 1), 1)))
        write_outputs(ds, tmp, rows_per_shard)
        counts = _reason_counts(ds)
        profile = ds.map_batches(_kept_profile, batch_format="pandas").to_pandas()
        augmented = int(profile["augmented"].sum())
        kept = counts.get("kept", 0)
        rejected = sum(v for k, v in counts.items() if k != "kept")
        if kept - augmented + rejected != n_in:
            raise ConservationError(f"{n_in} records in, but {kept - augmented} kept (+{augmented} augmented) "
                                    f"+ {rejected} rejected")
        plot_histograms({"words per kept document": profile["words"].tolist(),
                         "perplexity (reference LM)": profile["perplexity"].dropna().tolist()},
                        tmp / "histograms.png", title=f"{kept} kept of {n_in} documents")
        timings["write"] = time.time() - t
        stats = summarize(data, n_in, in_bytes, counts, near, timings)
        stats["augmented"] = augmented
        stats["shards"] = len(list((tmp / "kept").glob("*.parquet")))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("curate: %d in, %d kept, %d rejected -> %s", n_in, kept, rejected, out)
    return stats


def summarize(data: DataConfig, n_in: int, in_bytes: int, counts: dict, near: int, timings: dict) -> dict:
    by_step: dict[str, dict[str, int]] = {}
    for reason, n in sorted(counts.items()):
        if reason != "kept":
            by_step.setdefault(step_of(reason), {})[reason] = n
    total = sum(timings.values())
    return {
        "docs_in": n_in, "kept": counts.get("kept", 0), "rejected": sum(v for k, v in counts.items() if k != "kept"),
        "by_reason": dict(sorted(counts.items())), "by_step": by_step, "near_duplicates": near,
        "input_mb": round(in_bytes / 1e6, 3), "seconds": {k: round(v, 2) for k, v in timings.items()},
        "docs_per_s": round(n_in / total, 1), "mb_per_s": round(in_bytes / 1e6 / total, 3),
        "dedup": data.dedup.model_dump(), "filters": data.filters.model_dump(),
    }

"""The curate stage: a chain of steps over the corpus, then kept/ and rejected/ Parquet, stats.json
and a plot.

read -> extract (web pages' text) -> normalize -> [language] -> filters -> [perplexity] -> [exact_dedup]
-> [fuzzy_dedup] -> [augment] -> write.
Every step only marks rows (`reason` and `step` for the ones it drops, records.reject); nothing is
removed until the end, where input = kept (less augmented rows) + rejected is checked.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import DataConfig, PerplexityConfig, PipelineConfig
from pipeline.curate import arrow_text
from pipeline.curate.dedup_exact import exact_dedup
from pipeline.curate.dedup_fuzzy import fuzzy_dedup
from pipeline.curate.filters import apply_filters, build_filters
from pipeline.curate.language import language_batch
from pipeline.curate.normalize import normalize_batch
from pipeline.curate.read import ReadOptions, expand_inputs, read_corpus
from pipeline.curate.records import is_kept
from pipeline.curate.web import extract_batch
from pipeline.runtime import atomic_dir
from pipeline.terminal import progress

log = logging.getLogger("pipeline.curate")

KEPT_COLUMNS = ["id", "text", "source", "meta", "perplexity", "augmented_from"]
REJECTED_COLUMNS = ["id", "text", "raw", "source", "meta", "reason", "step", "duplicate_of", "jaccard", "perplexity"]


class ConservationError(RuntimeError):
    """Input records != kept + rejected: something was lost, which must never pass silently."""


@dataclass(frozen=True)
class Step:
    """One link of the chain: takes the dataset, marks rows, passes every row on. `apply` may return
    (dataset, figures) where the step has figures for stats.json."""

    name: str
    apply: Callable[[ray.data.Dataset], ray.data.Dataset | tuple[ray.data.Dataset, dict]]
    fused: bool = False  # a cheap per-row map that runs in the next step's tasks instead of materializing alone


def map_step(name: str, fn: Callable, batch_format: str = "pyarrow", **kwargs) -> Step:
    return Step(name, lambda ds: ds.map_batches(fn, batch_format=batch_format, fn_kwargs=kwargs), fused=True)


# The model steps import torch and transformers, and the histograms matplotlib, where they are used, not at the
# top: every Ray worker that runs one of this module's functions (the write's row selection, say) imports
# the module, and those imports cost it 6 s of a core (the bench's whole write took 11.8 s for it).


def score_perplexity(ds: ray.data.Dataset, settings: PerplexityConfig, trust_remote_code: bool) -> ray.data.Dataset:
    from pipeline.curate.perplexity import PerplexityScorer

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    return ds.map_batches(
        PerplexityScorer,
        batch_format="pandas",
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={
            "model_path": settings.model_path,
            "trust_remote_code": trust_remote_code,
            "max_tokens": settings.max_tokens,
            "max_perplexity": settings.max_perplexity,
        },
    )


def curate_steps(cfg: PipelineConfig) -> list[Step]:
    """The chain this config asks for, in order."""
    data = cfg.data
    steps = [map_step("extract", extract_batch), map_step("normalize", normalize_batch, lowercase=data.lowercase)]
    if data.filters.languages:
        steps.append(map_step("language", language_batch, "pandas", languages=data.filters.languages))
    steps.append(
        Step(
            "filters",
            lambda ds: ds.map_batches(
                apply_filters, batch_format="pyarrow", fn_kwargs={"filters": build_filters(data.filters)}
            ),
        )
    )
    if data.perplexity.model_path:
        steps.append(
            Step(
                "perplexity",
                partial(score_perplexity, settings=data.perplexity, trust_remote_code=cfg.model.trust_remote_code),
            )
        )
    if data.dedup.exact:
        steps.append(Step("exact_dedup", exact_dedup))
    if data.dedup.fuzzy:
        steps.append(Step("fuzzy_dedup", partial(fuzzy_dedup, dedup=data.dedup)))
    if data.augment.back_translation_models or data.augment.synonym_model:
        from pipeline.curate.augment import augment

        steps.append(
            Step("augment", partial(augment, settings=data.augment, trust_remote_code=cfg.model.trust_remote_code))
        )
    return steps


def run_steps(
    ds: ray.data.Dataset, steps: list[Step], timings: dict[str, float], figures: dict[str, dict]
) -> tuple[int, ray.data.Dataset]:
    """Run the chain; time each materialized group of steps under its names joined by '+', and keep the
    steps' figures by step name. Returns the rows where the chain starts (no step drops a row, so the
    first group's count is the input's) and the dataset at its end."""
    rows_in, names, start = None, [], time.perf_counter()
    for step in steps:
        ds = step.apply(ds)
        if isinstance(ds, tuple):
            ds, figures[step.name] = ds
        names.append(step.name)
        if not step.fused:
            ds = ds.materialize()
            # Ray Data's datasets sit in reference cycles: the group before this one holds its blocks in the
            # object store until Python's cycle collector runs, and the next group would take fresh memory
            # beside them (bench/curate.py's first curate wrote 1.16 GB of the object store for its 235 MB
            # corpus before this and exact dedup's digest-only sort, 0.74 GB after)
            gc.collect()
            timings["+".join(names)] = round(time.perf_counter() - start, 2)
            rows_in = ds.count() if rows_in is None else rows_in
            names, start = [], time.perf_counter()
    return rows_in, ds


def _select(batch: pa.Table, kept: bool, columns: list[str]) -> pa.Table:
    rows = batch.filter(is_kept(batch) if kept else pc.invert(is_kept(batch)))
    return rows.select([c for c in columns if c in batch.column_names])


# The kept documents' histograms are tallied inside the blocks over fixed bins, twenty a decade, so that the
# driver receives a few rows per block however large the corpus, never a row per document.
HISTOGRAM_BINS = np.geomspace(1, 1e8, 161)
HISTOGRAMS = {"words": "words per kept document", "perplexity": "perplexity (reference LM)"}
TALLY_SCHEMA = pa.schema(
    [
        ("step", pa.string()),
        ("reason", pa.string()),
        ("count_all", pa.int64()),
        ("augmented", pa.int64()),
        ("words", pa.list_(pa.int64())),
        ("perplexity", pa.list_(pa.int64())),
    ]
)


def _histogram(values: pa.Array) -> list[int]:
    """Counts over HISTOGRAM_BINS: nulls and NaN (rows never scored) are left out, values below 1 (an empty
    text) go to the first bin and infinite ones to the last."""
    values = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.histogram(np.clip(values, 1, HISTOGRAM_BINS[-1]), HISTOGRAM_BINS)[0].tolist()


def _tally(batch: pa.Table) -> pa.Table:
    """This block's rows per (step, reason) ("" and "" for the kept ones); the kept row also carries how
    many augmentation made and the kept documents' histograms."""
    groups = batch.group_by(["step", "reason"]).aggregate([([], "count_all")]).to_pylist()
    kept = batch.filter(is_kept(batch))
    perplexity = kept["perplexity"] if "perplexity" in kept.column_names else pa.nulls(len(kept), pa.float64())
    profile = {
        "augmented": pc.sum(pc.not_equal(kept["augmented_from"], "")).as_py() or 0,
        "words": _histogram(arrow_text.word_counts(kept["text"])),
        "perplexity": _histogram(perplexity),
    }
    empty = {"augmented": 0, "words": [], "perplexity": []}
    rows = [{**g, **(profile if g["step"] == g["reason"] == "" else empty)} for g in groups]
    return pa.Table.from_pylist(rows, schema=TALLY_SCHEMA)


def write_outputs(ds: ray.data.Dataset, tmp: Path, rows_per_shard: int) -> None:
    ds.map_batches(_select, batch_format="pyarrow", fn_kwargs={"kept": True, "columns": KEPT_COLUMNS}).write_parquet(
        str(tmp / "kept"), min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard
    )
    ds.map_batches(
        _select, batch_format="pyarrow", fn_kwargs={"kept": False, "columns": REJECTED_COLUMNS}
    ).write_parquet(str(tmp / "rejected"))
    (tmp / "rejected").mkdir(exist_ok=True)  # an all-kept run still has the folder
    (tmp / "kept").mkdir(exist_ok=True)


@contextmanager
def every_cpu_from_the_start():
    """Ray Data's resource allocator learns the cluster's CPUs from its autoscaling coordinator about a second
    into each execution, and runs one task at a time until then. Curate is half a dozen short executions
    (each group of steps, the two writes, the tally), each on what the one before materialized (the first
    on the input files), so the allocator's reservations between the operators of a long pipeline have
    little to arbitrate here: without it, bench/curate.py's curate takes 17.3 s instead of 20.7 on 2 CPUs.
    Datasets keep the setting they were made under, so it is off for curate's and only for them."""
    context = ray.data.DataContext.get_current()
    before, context.op_resource_reservation_enabled = context.op_resource_reservation_enabled, False
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = before


@contextmanager
def collections_see_only_new_objects():
    """run_steps collects garbage between groups to free a group's blocks, with every worker idle; with the
    process's older objects frozen (Ray's, Ray Data's, pandas', ...) a collection walks only what curate made
    since it started, which holds those blocks' datasets: 0.01-0.02 s instead of 0.09 on bench/curate.py's
    corpus."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@every_cpu_from_the_start()
@collections_see_only_new_objects()
def run_curate(cfg: PipelineConfig, inputs: list[str] | None = None, out_dir: str | Path | None = None) -> dict:
    data = cfg.data
    out = Path(out_dir) if out_dir else cfg.stage_dir("curate")
    files = expand_inputs(inputs or data.input)
    in_bytes = sum(Path(f).stat().st_size for f in files)
    opts = ReadOptions(
        data.text_field, data.id_field, tuple(data.keep_fields), dict(data.rename), data.table, data.image_text
    )
    timings: dict[str, float] = {}
    figures: dict[str, dict] = {}
    read = Step("read", lambda _: read_corpus(files, opts), fused=True)
    steps = [read, *curate_steps(cfg)]
    log.info("curate: %d file(s), %.1f MB -> %s", len(files), in_bytes / 1e6, out)
    # one tick per materialized group of steps and one for the write: timings gets an entry as each ends
    with progress(sum(not s.fused for s in steps) + 1, "curate", lambda: len(timings)):
        n_in, ds = run_steps(None, steps, timings, figures)
        start = time.perf_counter()
        with atomic_dir(out) as tmp, ThreadPoolExecutor(1) as drawing:
            kept, counts, augmented, histograms = account(ds, n_in)
            # the plot is drawn while the workers write the blocks, when the driver would only wait on them
            plot = drawing.submit(plot_kept_histograms, histograms, tmp / "histograms.png", kept, n_in)
            rows_per_shard = max(1, int(data.shard_mb * 1e6 / max(in_bytes / max(n_in, 1), 1)))
            write_outputs(ds, tmp, rows_per_shard)
            plot.result()
            timings["write"] = round(time.perf_counter() - start, 2)
            stats = {**summarize(data, n_in, in_bytes, kept, counts, timings), **figures}
            stats.update(augmented=augmented, shards=len(list((tmp / "kept").glob("*.parquet"))))
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def account(ds: ray.data.Dataset, n_in: int) -> tuple[int, dict[tuple[str, str], int], int, dict[str, np.ndarray]]:
    """Kept rows, rejected rows per (step, reason), augmented rows, checked to add up to the input, and the
    kept documents' histograms (counts over HISTOGRAM_BINS by HISTOGRAMS' names). One pass over the blocks,
    which send their tallies."""
    tallies = ray.get(ds.map_batches(_tally, batch_format="pyarrow").to_arrow_refs())
    counts: dict[tuple[str, str], int] = {}
    augmented, bins = 0, {name: np.zeros(len(HISTOGRAM_BINS) - 1, np.int64) for name in HISTOGRAMS}
    for row in (row for tally in tallies for row in tally.to_pylist()):
        key = (row["step"], row["reason"])
        counts[key] = counts.get(key, 0) + row["count_all"]
        if key == ("", ""):
            augmented += row["augmented"]
            for name in HISTOGRAMS:
                bins[name] += row[name]
    kept = counts.pop(("", ""), 0)
    rejected = sum(counts.values())
    if kept - augmented + rejected != n_in:
        raise ConservationError(
            f"{n_in} records in, but {kept - augmented} kept (+{augmented} augmented) + {rejected} rejected"
        )
    return kept, counts, augmented, bins


def plot_kept_histograms(bins: dict[str, np.ndarray], path: Path, kept: int, n_in: int) -> None:
    from pipeline.plots import plot_histograms

    series = {label: (HISTOGRAM_BINS, bins[name]) for name, label in HISTOGRAMS.items()}
    plot_histograms(series, path, title=f"{kept} kept of {n_in} documents")


def summarize(
    data: DataConfig, n_in: int, in_bytes: int, kept: int, rejected: dict[tuple[str, str], int], timings: dict
) -> dict:
    """`rejected`: rows per (step, reason)."""
    by_reason, by_step = {"kept": kept}, {}
    for (step, reason), n in sorted(rejected.items()):
        by_reason[reason] = by_reason.get(reason, 0) + n
        by_step.setdefault(step, {})[reason] = n
    total = sum(timings.values())
    return {
        "docs_in": n_in,
        "kept": kept,
        "rejected": sum(rejected.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "by_step": by_step,
        "near_duplicates": by_reason.get("near duplicate", 0),
        "input_mb": round(in_bytes / 1e6, 3),
        "seconds": timings,
        "docs_per_s": round(n_in / total, 1),
        "mb_per_s": round(in_bytes / 1e6 / total, 3),
        "dedup": data.dedup.model_dump(),
        "filters": data.filters.model_dump(),
    }

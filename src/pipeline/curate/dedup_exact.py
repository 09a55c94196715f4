"""Exact dedup: hash the normalized text; rows that share a hash keep only the lowest id.

Sorting on the digest puts every copy of a text in one block, which can decide alone;
nothing is gathered in the driver.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import ray

from pipeline.curate.records import is_kept, reject
from pipeline.runtime import rows_per_batch


def add_digest(batch: pd.DataFrame) -> pd.DataFrame:
    batch["digest"] = [
        hashlib.sha1(t.encode()).hexdigest() if r == "" else f"rejected:{i}"
        for t, r, i in zip(batch["text"], batch["reason"], batch["id"])
    ]
    return batch


def mark_exact_duplicates(block: pd.DataFrame) -> pd.DataFrame:
    """Within a block holding every copy of its texts: each copy but the lowest id is a duplicate of it."""
    kept = is_kept(block)
    survivor = block["digest"].map(block[kept].groupby("digest")["id"].min()).tolist()
    dup = [k and s != i for k, s, i in zip(kept.tolist(), survivor, block["id"].tolist())]
    block["duplicate_of"] = [s if d else o for d, s, o in zip(dup, survivor, block["duplicate_of"].tolist())]
    block["jaccard"] = [1.0 if d else j for d, j in zip(dup, block["jaccard"].tolist())]
    return reject(block, ["exact duplicate" if d else "" for d in dup], "exact_dedup")


def exact_dedup(ds: ray.data.Dataset) -> ray.data.Dataset:
    ds = ds.materialize()
    ds = ds.map_batches(add_digest, batch_format="pandas", batch_size=rows_per_batch(ds)).sort("digest")
    return ds.map_batches(mark_exact_duplicates, batch_format="pandas", batch_size=None).drop_columns(["digest"])

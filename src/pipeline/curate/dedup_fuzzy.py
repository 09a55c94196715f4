"""Fuzzy dedup with MinHash-LSH, distributed on Ray Data.

1. `map_batches`: a datasketch MinHash per document over word n-gram shingles; emit one
   row per LSH band (band key, id, signature). Bands x rows come from the threshold the
   same way datasketch's `MinHashLSH` derives them.
2. Hash-partition on the band key: every block holds whole buckets. Inside a bucket,
   candidate pairs are verified by estimated Jaccard (share of equal signature slots) and
   joined with a local union-find, which emits at most one edge per document.
3. The driver unions those edges (far fewer than documents; no signature leaves the
   workers) and every component keeps its lowest id; the others point to it.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import ray
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from pipeline.curate.records import is_kept

SEED = 1  # fixed: signatures must agree across workers and runs


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band), minimising false positives + negatives like MinHashLSH."""
    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def shingles(text: str, ngram: int) -> list[bytes]:
    words = text.split()
    if len(words) <= ngram:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + ngram]).encode() for i in range(len(words) - ngram + 1)]


def minhash(text: str, num_perm: int, ngram: int) -> np.ndarray:
    mh = MinHash(num_perm=num_perm, seed=SEED)
    mh.update_batch(shingles(text, ngram))
    return mh.hashvalues


def band_rows(batch: pd.DataFrame, num_perm: int, ngram: int, bands: int, rows: int) -> pd.DataFrame:
    keys, ids, sigs = [], [], []
    kept = batch[is_kept(batch)]
    for doc_id, text in zip(kept["id"], kept["text"]):
        sig = minhash(text, num_perm, ngram)
        blob = sig.tobytes()
        for b in range(bands):
            band = sig[b * rows:(b + 1) * rows].tobytes()
            keys.append(f"{b}:{hashlib.blake2b(band, digest_size=8).hexdigest()}")
            ids.append(doc_id)
            sigs.append(blob)
    return pd.DataFrame({"band_key": keys, "id": ids, "signature": sigs})


class UnionFind:
    """Union-find whose root is always the smallest id, so survivors are deterministic."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo

    def roots(self) -> dict[str, str]:
        return {x: self.find(x) for x in list(self.parent)}


def bucket_edges(block: pd.DataFrame, threshold: float) -> pd.DataFrame:
    uf = UnionFind()
    for _, bucket in block.groupby("band_key"):
        if len(bucket) < 2:
            continue
        bucket = bucket.drop_duplicates("id").sort_values("id")
        ids = bucket["id"].tolist()
        sigs = np.stack([np.frombuffer(s, dtype=np.uint64) for s in bucket["signature"]])
        for i in range(len(ids) - 1):
            similar = (sigs[i + 1:] == sigs[i]).mean(axis=1) >= threshold
            for j in np.nonzero(similar)[0]:
                uf.union(ids[i], ids[i + 1 + j])
    pairs = [(x, root) for x, root in uf.roots().items() if x != root]
    return pd.DataFrame({"id": [p[0] for p in pairs], "root": [p[1] for p in pairs]})


def mark_near_duplicates(batch: pd.DataFrame, duplicate_of_ref) -> pd.DataFrame:
    duplicate_of: dict[str, str] = ray.get(duplicate_of_ref)
    survivor = batch["id"].map(duplicate_of)
    dup = is_kept(batch) & survivor.notna()
    batch.loc[dup, "reason"] = "near duplicate"
    batch.loc[dup, "duplicate_of"] = survivor[dup]
    # an exact copy of a document that is itself a near duplicate points on to the final survivor
    chained = (batch["reason"] == "exact duplicate") & batch["duplicate_of"].isin(duplicate_of.keys())
    batch.loc[chained, "duplicate_of"] = batch.loc[chained, "duplicate_of"].map(duplicate_of)
    return batch


def fuzzy_dedup(ds: ray.data.Dataset, threshold: float, num_perm: int, ngram: int,
                num_blocks: int) -> tuple[ray.data.Dataset, int]:
    """Returns the annotated dataset and the number of near-duplicates found."""
    bands, rows = lsh_params(threshold, num_perm)
    keyed = ds.map_batches(band_rows, batch_format="pandas",
                           fn_kwargs={"num_perm": num_perm, "ngram": ngram, "bands": bands, "rows": rows})
    edges = (keyed.repartition(num_blocks, keys=["band_key"])
             .map_batches(bucket_edges, batch_format="pandas", batch_size=None,
                          fn_kwargs={"threshold": threshold}))
    uf = UnionFind()
    for row in edges.iter_rows():
        uf.union(row["id"], row["root"])
    duplicate_of = {x: root for x, root in uf.roots().items() if x != root}
    ref = ray.put(duplicate_of)
    marked = ds.map_batches(mark_near_duplicates, batch_format="pandas", fn_kwargs={"duplicate_of_ref": ref})
    return marked, len(duplicate_of)

"""Fuzzy dedup with MinHash-LSH, distributed on Ray Data, verified by exact Jaccard.

1. Candidates: MinHash signatures of whole batches at once (curate/minhash.py); one row per
   (document, LSH band) with the band's bucket key. Bands x rows come from the threshold with
   datasketch's own parameter search, weighted towards recall: every candidate is verified
   exactly, so a false positive only costs a check. Rows are hash-partitioned on the bucket
   key; a bucket's documents become candidate pairs.
2. Verification: each document of a candidate pair sends its shingle set to the pair's
   partition, where the exact Jaccard decides. Only pairs and edges reach the driver, never
   signatures or texts.
3. Components: the driver unions the verified edges; each component keeps its lowest id and
   every other member points to it.
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pandas as pd
import ray
from datasketch.lsh import _optimal_param

from pipeline.curate.jaccard import jaccard, shingle_sets
from pipeline.curate.minhash import signatures
from pipeline.curate.records import is_kept

STAR_ABOVE = 12  # larger buckets pair each member with the bucket's lowest id only, not all pairs


def lsh_params(threshold: float, num_perm: int, recall_weight: float) -> tuple[int, int]:
    """(bands, rows per band), as datasketch's MinHashLSH(weights=(1 - w, w)) chooses them."""
    return _optimal_param(threshold, num_perm, 1 - recall_weight, recall_weight)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64 bucket keys; the band index is mixed in so bands never share a bucket."""
    mult = np.random.default_rng(7).integers(1, 2**63, size=rows + 1, dtype=np.uint64) | np.uint64(1)
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    for b in range(bands):
        band = sigs[:, b * rows:(b + 1) * rows].astype(np.uint64)
        keys[:, b] = (band * mult[:rows]).sum(axis=1, dtype=np.uint64) + np.uint64(b) * mult[rows]
    return keys


def doc_keys(ids) -> np.ndarray:
    """64-bit keys for ids: the shuffles move 16-byte rows instead of id strings (collisions: 2^-64)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
                        for i in ids), dtype=np.int64, count=len(ids))


def band_rows(batch: pd.DataFrame, num_perm: int, ngram: int, bands: int, rows: int) -> pd.DataFrame:
    kept = batch[is_kept(batch)]
    keys = band_keys(signatures(kept["text"].tolist(), num_perm, ngram), bands, rows)
    return pd.DataFrame({"band_key": keys.reshape(-1).view(np.int64), "doc": np.repeat(doc_keys(kept["id"]), bands)})


def bucket_pairs(block: pd.DataFrame) -> pd.DataFrame:
    """Candidate pairs (a < b) of documents that share a bucket."""
    rows = block.drop_duplicates().sort_values(["band_key", "doc"])
    keys, docs = rows["band_key"].to_numpy(), rows["doc"].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    two = starts[sizes == 2]  # the common case, vectorized
    pairs = [np.stack([docs[two], docs[two + 1]], axis=1)]
    for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):
        members = docs[start:start + size]
        if size > STAR_ABOVE:
            pairs.append(np.stack([np.full(size - 1, members[0]), members[1:]], axis=1))
        else:
            pairs.append(np.array(list(itertools.combinations(members, 2)), dtype=np.int64))
    both = np.unique(np.concatenate(pairs).reshape(-1, 2), axis=0)
    return pd.DataFrame({"a": both[:, 0], "b": both[:, 1]})


def shingle_rows(batch: pd.DataFrame, partners_ref, ngram: int) -> pd.DataFrame:
    """For every candidate pair a document is in: (pair, its id, its shingle set)."""
    partners: dict[int, list[tuple[int, int]]] = ray.get(partners_ref)
    keys = doc_keys(batch["id"])
    wanted = np.fromiter((k in partners for k in keys.tolist()), dtype=bool, count=len(keys))
    rows = []
    if wanted.any():
        sets = shingle_sets(batch.loc[wanted, "text"].tolist(), ngram)
        for key, doc_id, shingles in zip(keys[wanted].tolist(), batch.loc[wanted, "id"].tolist(), sets):
            blob = shingles.tobytes()
            rows += [(a, b, doc_id, blob) for a, b in partners[key]]
    return pd.DataFrame(rows, columns=["a", "b", "id", "shingles"]).astype({"a": "int64", "b": "int64"})


def verify_pairs(block: pd.DataFrame, threshold: float) -> pd.DataFrame:
    edges = []
    for _, sides in block.groupby(["a", "b"]):
        if len(sides) != 2:
            continue
        x, y = (np.frombuffer(s, dtype=np.uint64) for s in sides["shingles"])
        if jaccard(x, y) >= threshold:
            edges.append(tuple(sides["id"]))
    return pd.DataFrame(edges, columns=["a", "b"])


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


def mark_near_duplicates(batch: pd.DataFrame, duplicate_of_ref) -> pd.DataFrame:
    duplicate_of: dict[str, str] = ray.get(duplicate_of_ref)
    reasons, targets = batch["reason"].tolist(), batch["duplicate_of"].tolist()
    for i, doc_id in enumerate(batch["id"].tolist()):
        if reasons[i] == "" and doc_id in duplicate_of:
            reasons[i], targets[i] = "near duplicate", duplicate_of[doc_id]
        elif reasons[i] == "exact duplicate" and targets[i] in duplicate_of:
            # an exact copy of a document that is itself a near duplicate points on to the final survivor
            targets[i] = duplicate_of[targets[i]]
    batch["reason"], batch["duplicate_of"] = reasons, targets  # whole columns (see normalize_batch)
    return batch


def fuzzy_dedup(ds: ray.data.Dataset, threshold: float, num_perm: int, ngram: int, num_blocks: int,
                recall_weight: float = 0.95) -> tuple[ray.data.Dataset, int]:
    """Returns the annotated dataset and the number of near-duplicates found."""
    bands, rows = lsh_params(threshold, num_perm, recall_weight)
    keyed = ds.map_batches(band_rows, batch_format="pandas",
                           fn_kwargs={"num_perm": num_perm, "ngram": ngram, "bands": bands, "rows": rows})
    candidates = (keyed.repartition(num_blocks, keys=["band_key"])
                  .map_batches(bucket_pairs, batch_format="pandas", batch_size=None))
    pairs = candidates.to_pandas().drop_duplicates()
    partners: dict[int, list[tuple[int, int]]] = {}
    for a, b in zip(pairs["a"].tolist(), pairs["b"].tolist()):
        partners.setdefault(a, []).append((a, b))
        partners.setdefault(b, []).append((a, b))
    uf = UnionFind()
    if partners:
        edges = (ds.map_batches(shingle_rows, batch_format="pandas",
                                fn_kwargs={"partners_ref": ray.put(partners), "ngram": ngram})
                 .repartition(num_blocks, keys=["a", "b"])
                 .map_batches(verify_pairs, batch_format="pandas", batch_size=None,
                              fn_kwargs={"threshold": threshold}))
        for a, b in edges.to_pandas().itertuples(index=False):
            uf.union(a, b)
    duplicate_of = {x: root for x, root in uf.roots().items() if x != root}
    ref = ray.put(duplicate_of)
    marked = ds.map_batches(mark_near_duplicates, batch_format="pandas", fn_kwargs={"duplicate_of_ref": ref})
    return marked, len(duplicate_of)

"""Fuzzy dedup with MinHash-LSH, distributed on Ray Data, verified by Jaccard of the shingle sets.

1. Candidates: MinHash signatures of whole batches at once (curate/minhash.py) become one row per
   (document, LSH band) with the band's bucket key. Bands x rows come from the threshold with
   datasketch's own parameter search, weighted towards recall: every candidate is verified, so a
   false positive only costs a check. Sorting on the bucket key puts each bucket in one block,
   where its documents become candidate pairs.
2. Verification: each document of a candidate pair sends its shingle set (32-bit fingerprints, as
   one bytes blob) under the pair's key; sorting on the pair brings both sides together and their
   exact Jaccard decides.
   Only pairs and edges reach the driver, never signatures or texts.
3. Components: the driver unions the verified edges; each component keeps its lowest id and
   every other member points to it.

Speed: blocks travel as Arrow; each map task takes ~32 MB of text (Ray Data's per-task cost
dwarfs hashing a small block); the groupings are sorts with precomputed boundaries (keys are
hashes, so even splits need no sampling pass), run as tasks (see `init_ray`): hash shuffles
start actors, which costs seconds on a small cluster.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import DedupConfig
from pipeline.curate.minhash import mix64, shingle_hashes, signatures
from pipeline.runtime import rows_per_batch

log = logging.getLogger("pipeline.curate")

STAR_ABOVE = 12  # larger buckets pair each member with the bucket's lowest key only, not all pairs


def lsh_params(threshold: float, num_perm: int, recall_weight: float) -> tuple[int, int]:
    """(bands, rows per band) minimizing (1 - w) * P(false positive) + w * P(false negative), the
    search datasketch's MinHashLSH(weights=(1 - w, w)) makes (a test checks they agree), integrated
    with numpy instead of scipy's quad: scipy's import alone costs the driver a quarter second."""
    below, above = np.linspace(0, threshold, 4001), np.linspace(threshold, 1, 4001)
    best, choice = np.inf, (1, 1)
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below, axis=1)
        false_negative = np.trapezoid((1 - above**rows) ** bands, above, axis=1)
        error = (1 - recall_weight) * false_positive + recall_weight * false_negative
        if error.min() < best:
            best, choice = error.min(), (bands, int(error.argmin()) + 1)
    return choice


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) int64 bucket keys; the band index is mixed in so bands never share a bucket."""
    mult = np.random.default_rng(7).integers(1, 2**63, size=rows + 1, dtype=np.uint64) | np.uint64(1)
    by_band = sigs[:, : bands * rows].astype(np.uint64).reshape(len(sigs), bands, rows)
    keys = (by_band * mult[:rows]).sum(axis=2, dtype=np.uint64)
    keys += np.arange(bands, dtype=np.uint64) * mult[rows]
    return keys.view(np.int64)


def doc_keys(ids) -> np.ndarray:
    """64-bit keys for ids: the sorts move 16-byte rows instead of id strings (collisions: 2^-64)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True) for i in ids),
        dtype=np.int64,
        count=len(ids),
    )


def _kept(batch: pa.Table) -> pa.Table:
    """The ids and texts of the rows no earlier step rejected (only those columns are copied)."""
    return batch.select(["id", "text"]).filter(pc.equal(batch["reason"], ""))


def band_rows(batch: pa.Table, num_perm: int, ngram: int, bands: int, rows: int) -> pa.Table:
    kept = _kept(batch)
    keys = band_keys(signatures(kept["text"], num_perm, ngram), bands, rows)
    return pa.table({"band_key": keys.reshape(-1), "doc": np.repeat(doc_keys(kept["id"].to_pylist()), bands)})


def bucket_pairs(block: pa.Table) -> pa.Table:
    """Candidate pairs (a < b) of documents that share a bucket (the block holds whole buckets,
    sorted by bucket and document)."""
    keys, docs = block["band_key"].to_numpy(), block["doc"].to_numpy()
    if not len(keys):
        return pa.table({"a": keys, "b": docs})
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (docs[1:] != docs[:-1])])
    keys, docs = keys[starts], docs[starts]  # a document listed twice in a bucket counts once
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for size in np.unique(sizes[sizes > 1]):  # buckets of equal size at once
        first = starts[sizes == size]
        if size > STAR_ABOVE:
            i, j = np.zeros(size - 1, dtype=np.int64), np.arange(1, size)
        else:
            i, j = np.triu_indices(size, k=1)
        pairs.append(np.stack([docs[first[:, None] + i].ravel(), docs[first[:, None] + j].ravel()], axis=1))
    both = unique_rows(np.concatenate(pairs))
    return pa.table({"a": both[:, 0], "b": both[:, 1]})


def even_split(parts: int) -> list[int]:
    """Boundaries cutting uniformly spread int64 keys (hashes) into `parts` equal ranges: the sorts
    below take them instead of sampling the data for them first."""
    return [int(x) for x in np.linspace(-(2.0**63), 2.0**63, parts + 1)[1:-1]]


def unique_rows(pairs: np.ndarray) -> np.ndarray:
    """Distinct rows of an (n, 2) array, sorted (a lexsort: twice as fast as np.unique(axis=0))."""
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs[np.r_[True, (pairs[1:] != pairs[:-1]).any(axis=1)]] if len(pairs) else pairs


def fingerprint_sets(texts, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text's distinct 32-bit shingle fingerprints, sorted, concatenated; and each text's start
    (with a final end). Two distinct shingles share a fingerprint with probability 2^-32."""
    hashes, offsets = shingle_hashes(texts, ngram)
    doc = np.repeat(np.arange(len(offsets), dtype=np.uint64), np.diff(np.r_[offsets, len(hashes)]))
    tagged = (doc << np.uint64(32)) | (mix64(hashes) >> np.uint64(32))
    tagged.sort()  # not np.unique: numpy 2.4's hash-based unique is ~100x slower on these arrays
    tagged = tagged[np.r_[True, tagged[1:] != tagged[:-1]]]
    bounds = np.searchsorted(tagged >> np.uint64(32), np.arange(len(offsets) + 1, dtype=np.uint64))
    return (tagged & np.uint64(0xFFFFFFFF)).astype(np.uint32), bounds


def pair_sides(batch: pa.Table, pairs_ref, ngram: int) -> pa.Table:
    """For every candidate pair a document of this batch is in: (a, b, its id, its shingle set)."""
    pair_a, pair_b = ray.get(pairs_ref)
    kept = _kept(batch)
    keys = doc_keys(kept["id"].to_pylist())
    order = np.argsort(keys)
    sorted_keys = keys[order]
    side_pair, side_doc = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for end in (pair_a, pair_b) if len(keys) else ():
        at = np.minimum(np.searchsorted(sorted_keys, end), len(keys) - 1)
        hit = np.flatnonzero(sorted_keys[at] == end)
        side_pair.append(hit)
        side_doc.append(order[at[hit]])
    side_pair = np.concatenate(side_pair)
    wanted, side_doc = np.unique(np.concatenate(side_doc), return_inverse=True)
    values, bounds = fingerprint_sets(kept["text"].take(wanted), ngram)
    # one bytes blob per set: sorting and copying blobs moves whole buffers, where a list<uint32>
    # column would be gathered value by value
    sets = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(wanted), [None, pa.py_buffer(bounds * 4), pa.py_buffer(values)]
    )
    return pa.table(
        {
            "a": pair_a[side_pair],
            "b": pair_b[side_pair],
            "id": kept["id"].take(wanted[side_doc]),
            "shingles": sets.take(side_doc),
        }
    )


def verify_pairs(block: pa.Table, threshold: float) -> pa.Table:
    """Edges (id, id) of the pairs whose Jaccard >= threshold (the block holds both sides of each pair,
    sorted by pair, so a pair's two sides are neighbours)."""
    a, b = block["a"].to_numpy(), block["b"].to_numpy()
    first = np.flatnonzero((a[1:] == a[:-1]) & (b[1:] == b[:-1]))
    second = first + 1
    sets, ids = block["shingles"].combine_chunks(), block["id"].to_pylist()
    offsets = np.frombuffer(sets.buffers()[1], dtype=np.int64)[sets.offset : sets.offset + len(sets) + 1] // 4
    values = np.frombuffer(sets.buffers()[2], dtype=np.uint32) if len(sets) else np.zeros(0, dtype=np.uint32)
    edges = []
    for i, j in zip(first.tolist(), second.tolist()):
        x, y = values[offsets[i] : offsets[i + 1]], values[offsets[j] : offsets[j + 1]]
        at = np.minimum(np.searchsorted(x, y), len(x) - 1)
        inter = np.count_nonzero(x[at] == y)
        if inter >= threshold * (len(x) + len(y) - inter):
            edges.append((ids[i], ids[j]))
    return pa.table(
        {"a": [e[0] for e in edges], "b": [e[1] for e in edges]},
        schema=pa.schema([("a", pa.string()), ("b", pa.string())]),
    )


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


def mark_near_duplicates(batch: pa.Table, duplicates: pa.Array, survivors: pa.Array) -> pa.Table:
    """Reject the kept rows whose id is in `duplicates`, each pointing to its survivor (same position)."""
    if not len(duplicates):
        return batch
    reason, step, target = (batch[c].combine_chunks() for c in ("reason", "step", "duplicate_of"))

    def survivor_of(column: pa.Array, allowed: pa.Array) -> tuple[pa.Array, pa.Array]:
        found = pc.index_in(column, value_set=duplicates)
        return pc.and_(pc.is_valid(found), allowed), survivors.take(pc.fill_null(found, 0)).cast(target.type)

    near, survivor = survivor_of(batch["id"].combine_chunks(), pc.equal(reason, ""))
    # an exact copy of a document that is itself a near duplicate points on to the final survivor
    onward, onward_survivor = survivor_of(target, pc.equal(reason, "exact duplicate"))
    columns = {
        "duplicate_of": pc.if_else(onward, onward_survivor, pc.if_else(near, survivor, target)),
        "reason": pc.if_else(near, pa.scalar("near duplicate", reason.type), reason),
        "step": pc.if_else(near, pa.scalar("fuzzy_dedup", step.type), step),
    }
    for name, column in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, column)
    return batch


def _mark_near_duplicates(batch: pa.Table, duplicate_of_ref) -> pa.Table:
    return mark_near_duplicates(batch, *ray.get(duplicate_of_ref))


def fuzzy_dedup(ds: ray.data.Dataset, dedup: DedupConfig) -> ray.data.Dataset:
    """Marks near duplicates (reason "near duplicate", duplicate_of = the component's survivor)."""
    threshold, num_perm, ngram = dedup.threshold, dedup.num_perm, dedup.ngram
    start = time.perf_counter()
    ds = ds.materialize()  # read three times below
    batch = rows_per_batch(ds)
    split = even_split(-(-ds.count() // batch))
    bands, rows = lsh_params(threshold, num_perm, dedup.recall_weight)
    candidates = (
        ds.map_batches(
            band_rows,
            batch_format="pyarrow",
            batch_size=batch,
            fn_kwargs={"num_perm": num_perm, "ngram": ngram, "bands": bands, "rows": rows},
        )
        .sort(["band_key", "doc"], boundaries=split)
        .map_batches(bucket_pairs, batch_format="pyarrow", batch_size=None)
    )
    pairs = unique_rows(
        np.concatenate(
            [np.zeros((0, 2), dtype=np.int64)]
            + [
                np.stack([t["a"].to_numpy(), t["b"].to_numpy()], axis=1)
                for t in ray.get(candidates.to_arrow_refs())
                if t.num_rows
            ]
        )
    )  # (an empty block may come back without columns)
    log.info(
        "fuzzy dedup: %d candidate pairs from %d bands x %d rows (%.1f s)",
        len(pairs),
        bands,
        rows,
        time.perf_counter() - start,
    )
    uf = UnionFind()
    if len(pairs):
        sides = {"pairs_ref": ray.put((pairs[:, 0].copy(), pairs[:, 1].copy())), "ngram": ngram}
        edges = (
            ds.map_batches(pair_sides, batch_format="pyarrow", batch_size=batch, fn_kwargs=sides)
            .sort(["a", "b"], boundaries=split)
            .map_batches(verify_pairs, batch_format="pyarrow", batch_size=None, fn_kwargs={"threshold": threshold})
        )
        for table in filter(lambda t: t.num_rows, ray.get(edges.to_arrow_refs())):
            for a, b in zip(table["a"].to_pylist(), table["b"].to_pylist()):
                uf.union(a, b)
    duplicate_of = {x: root for x, root in uf.roots().items() if x != root}
    log.info(
        "fuzzy dedup: %d near duplicates in %d clusters (%.1f s)",
        len(duplicate_of),
        len(set(duplicate_of.values())),
        time.perf_counter() - start,
    )
    ref = ray.put((pa.array(list(duplicate_of), pa.string()), pa.array(list(duplicate_of.values()), pa.string())))
    return ds.map_batches(
        _mark_near_duplicates, batch_format="pyarrow", batch_size=batch, fn_kwargs={"duplicate_of_ref": ref}
    )

"""Fuzzy dedup with MinHash-LSH, distributed on Ray Data, verified by Jaccard of the shingle sets.

1. Candidates: MinHash signatures of whole batches at once (curate/minhash.py) become one row per
   (document, LSH band) with the band's bucket key. Bands x rows come from the threshold with
   datasketch's own parameter search, weighted towards recall: every candidate is verified, so a
   false positive only costs a check. Sorting on the bucket key puts each bucket in one block,
   where its documents become candidate pairs.
2. Verification: each document of a candidate pair sends its shingle set (32-bit fingerprints, as
   one bytes blob) under the pair's key; sorting on the pair brings both sides together and their
   exact Jaccard decides.
   The driver labels each candidate pair with its component in the candidate graph (a superset of
   each group of verified near duplicates), and the verification sort is on (component, pair), so a
   block holds whole components: verification and the choice of survivors (`choose_survivors`:
   greedy by default, so every removed document has a kept near duplicate) run in the same task.
   A giant component is one task's work, never the driver's.
   What reaches the driver: candidate pairs (16 bytes each) and one row per document that has a near
   duplicate, never signatures, texts or a component's edges.

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
from pipeline.curate.arrow_text import row_runs
from pipeline.curate.minhash import mix64, shingle_hashes, signatures
from pipeline.runtime import rows_per_batch

log = logging.getLogger("pipeline.curate")

# Buckets up to this size give all their pairs; a larger one (boilerplate) pairs each member with its lowest
# key only, which keeps the group connected but can leave two of its documents both kept under greedy
# survivors. Measured on bench/curate.py's corpus: 12 gave recall 0.977 under greedy, 64 gave 0.999 for
# 1.7x the candidate pairs (a bucket of 64 makes 2,016 pairs).
STAR_ABOVE = 64


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


def bucket_pairs(block: pa.Table, star_above: int = STAR_ABOVE) -> pa.Table:
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
        if size > star_above:
            i, j = np.zeros(size - 1, dtype=np.int64), np.arange(1, size)
        else:
            i, j = np.triu_indices(size, k=1)
        pairs.append(np.stack([docs[first[:, None] + i].ravel(), docs[first[:, None] + j].ravel()], axis=1))
    both = unique_rows(np.concatenate(pairs))
    return pa.table({"a": both[:, 0], "b": both[:, 1]})


def even_split(parts: int) -> list[int]:
    """Boundaries cutting uniformly spread int64 keys (hashes) into `parts` equal ranges (two at least): the
    sorts below take them instead of sampling the data for them first. They cut by the first sort key
    alone, so the rows that share it (a text's copies, a bucket, a component) stay in one block, which the
    dedups rely on. Given no boundary, Ray Data samples some over every sort key, which can cut such a
    group between two blocks by its second key."""
    return [int(x) for x in np.linspace(-(2.0**63), 2.0**63, max(parts, 2) + 1)[1:-1]]


def unique_rows(pairs: np.ndarray) -> np.ndarray:
    """Distinct rows of an (n, 2) array, sorted (a lexsort: twice as fast as np.unique(axis=0))."""
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs[np.r_[True, (pairs[1:] != pairs[:-1]).any(axis=1)]] if len(pairs) else pairs


def fingerprint_sets(texts, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text's distinct 32-bit shingle fingerprints, sorted, concatenated; and each text's start
    (with a final end). Two distinct shingles share a fingerprint with probability 2^-32. `texts`: Arrow
    strings or a list of str. Computed over runs of ~256 KiB of text (row_runs), where numpy's
    temporaries stay in cache."""
    if not isinstance(texts, pa.Array):
        texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else pa.array(texts, pa.large_string())
    values, bounds, start = [], [], 0
    for run in row_runs(texts):
        run_values, run_bounds = _fingerprint_sets(run, ngram)
        values.append(run_values)
        bounds.append(run_bounds[:-1] + start)
        start += len(run_values)
    return np.concatenate([np.zeros(0, np.uint32), *values]), np.concatenate([*bounds, [start]]).astype(np.int64)


def _fingerprint_sets(texts: pa.Array, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    hashes, offsets = shingle_hashes(texts, ngram)
    doc = np.repeat(np.arange(len(offsets), dtype=np.uint64), np.diff(np.r_[offsets, len(hashes)]))
    tagged = (doc << np.uint64(32)) | (mix64(hashes) >> np.uint64(32))
    tagged.sort()  # not np.unique: numpy 2.4's hash-based unique is ~100x slower on these arrays
    tagged = tagged[np.r_[True, tagged[1:] != tagged[:-1]]]
    bounds = np.searchsorted(tagged >> np.uint64(32), np.arange(len(offsets) + 1, dtype=np.uint64))
    return (tagged & np.uint64(0xFFFFFFFF)).astype(np.uint32), bounds


def pair_sides(batch: pa.Table, pairs_ref, ngram: int) -> pa.Table:
    """For every candidate pair a document of this batch is in: (the pair's component, a, b, which
    side, its id, its shingle set)."""
    pair_a, pair_b, pair_component = ray.get(pairs_ref)
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
    side_pair_parts = side_pair[1:]
    side_pair = np.concatenate(side_pair)
    wanted, side_doc = np.unique(np.concatenate(side_doc), return_inverse=True)
    values, bounds = fingerprint_sets(kept["text"].take(wanted), ngram)
    # one bytes blob per set: sorting and copying blobs moves whole buffers, where a list<uint32>
    # column would be gathered value by value
    sets = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(wanted), [None, pa.py_buffer(bounds * 4), pa.py_buffer(values)]
    )
    sides = [np.full(len(hits), side, dtype=np.int8) for side, hits in enumerate(side_pair_parts)]
    return pa.table(
        {
            "component": pair_component[side_pair],
            "a": pair_a[side_pair],
            "b": pair_b[side_pair],
            "side": np.concatenate([np.zeros(0, dtype=np.int8), *sides]),  # 0: this row is document a
            "id": kept["id"].take(wanted[side_doc]),
            "shingles": sets.take(side_doc),
        }
    )


EDGE_SCHEMA = pa.schema([("id_a", pa.string()), ("id_b", pa.string()), ("jaccard", pa.float64())])


def verify_pairs(block: pa.Table, threshold: float) -> pa.Table:
    """Edges (ids, Jaccard) of the pairs whose Jaccard >= threshold (the block holds both sides of each
    pair, sorted by pair, so a pair's two sides are neighbours)."""
    a, b = block["a"].to_numpy(), block["b"].to_numpy()
    first = np.flatnonzero((a[1:] == a[:-1]) & (b[1:] == b[:-1]))
    sets, ids, side = block["shingles"].combine_chunks(), block["id"].to_pylist(), block["side"].to_numpy()
    offsets = np.frombuffer(sets.buffers()[1], dtype=np.int64)[sets.offset : sets.offset + len(sets) + 1] // 4
    values = np.frombuffer(sets.buffers()[2], dtype=np.uint32) if len(sets) else np.zeros(0, dtype=np.uint32)
    edges = []
    for i in first.tolist():
        j = i + 1
        x, y = values[offsets[i] : offsets[i + 1]], values[offsets[j] : offsets[j + 1]]
        at = np.minimum(np.searchsorted(x, y), len(x) - 1)
        inter = np.count_nonzero(x[at] == y)
        union = len(x) + len(y) - inter
        if inter >= threshold * union:
            id_a, id_b = (ids[i], ids[j]) if side[i] == 0 else (ids[j], ids[i])
            edges.append((id_a, id_b, inter / union))
    return pa.table(list(zip(*edges)) if edges else [[] for _ in EDGE_SCHEMA], schema=EDGE_SCHEMA)


def component_roots(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documents of the pairs (sorted keys), and for each the smallest key of its connected component.
    Union-find on arrays: every pair hooks its larger root under the smaller, then pointers jump to
    their roots, until both ends of every pair share one."""
    nodes = np.sort(np.concatenate([a, b]))
    nodes = nodes[np.r_[True, nodes[1:] != nodes[:-1]]]  # not np.unique: numpy 2.4's hash path is slow here
    left, right = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    parent = np.arange(len(nodes))
    while len(left) and (parent[left] != parent[right]).any():
        roots_left, roots_right = parent[left], parent[right]
        np.minimum.at(parent, np.maximum(roots_left, roots_right), np.minimum(roots_left, roots_right))
        while (parent[parent] != parent).any():
            parent = parent[parent]
    return nodes, nodes[parent]  # a root is its component's smallest index, and keys are sorted


def component_keys(pairs: np.ndarray) -> np.ndarray:
    """Each candidate pair's component in the candidate graph, as a hash of the component's root. The root, its
    smallest key, leans towards the lowest sort range the more documents the component has: on bench/curate.py's
    corpus that range's block held 144,220 of the verification sort's 178,000 rows, one task's work while the
    other cores waited; hashed, the largest block holds 20,000."""
    nodes, roots = component_roots(pairs[:, 0], pairs[:, 1])
    return mix64(roots[np.searchsorted(nodes, pairs[:, 0])].view(np.uint64)).view(np.int64)


SURVIVOR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("duplicate_of", pa.string()),
        ("jaccard", pa.float64()),
        ("has_kept_neighbour", pa.bool_()),
        ("group", pa.string()),
    ]
)


def choose_survivors(edges: pa.Table, mode: str) -> pa.Table:
    """Every document of the verified edges (whole components: a document's edges are all here), with
    the document it is removed for ("" if kept), their Jaccard (NaN where they share no verified edge),
    whether a verified neighbour is kept, and its group of chained near duplicates (its smallest id).

    greedy: documents in survivor-priority order (lowest id first); one is kept unless a verified
    neighbour is kept already. So no two kept documents are near duplicates, and every removed one
    points at its most similar kept neighbour: a chain A~B~C keeps A and C.
    component: each group keeps its lowest id and the rest point at it (the rule before greedy),
    which can remove a document that resembles no kept one."""
    neighbours: dict[str, dict[str, float]] = {}
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, j in zip(*(edges[col].to_pylist() for col in ("id_a", "id_b", "jaccard"))):
        neighbours.setdefault(a, {})[b] = neighbours.setdefault(b, {})[a] = j
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        low, high = sorted((root(a), root(b)))
        parent[high] = low  # the smaller id stays the root
    removed: dict[str, tuple[str, float]] = {}
    kept: set[str] = set()
    for doc in sorted(neighbours):  # groups are independent: one walk in id order serves them all
        if mode == "greedy":
            near = [(-j, n) for n, j in neighbours[doc].items() if n in kept]
            if near:
                negative, survivor = min(near)
                removed[doc] = (survivor, -negative)
            else:
                kept.add(doc)
        elif root(doc) == doc:
            kept.add(doc)
        else:
            removed[doc] = (root(doc), neighbours[doc].get(root(doc), float("nan")))
    rows = [
        (doc, *removed.get(doc, ("", float("nan"))), any(n in kept for n in neighbours[doc]), root(doc))
        for doc in sorted(neighbours)
    ]
    return pa.table(list(zip(*rows)) if rows else [[] for _ in SURVIVOR_SCHEMA], schema=SURVIVOR_SCHEMA)


def verify_and_choose(block: pa.Table, threshold: float, mode: str) -> pa.Table:
    """A block of whole candidate components: verify its pairs, then choose its survivors."""
    return choose_survivors(verify_pairs(block, threshold), mode)


def mark_near_duplicates(batch: pa.Table, removed: pa.Table) -> pa.Table:
    """Reject the kept rows whose id `removed` lists, each pointing at its survivor with their Jaccard.
    An exact copy of a removed document points on to that survivor too."""
    if not removed.num_rows:
        return batch
    if "jaccard" not in batch.column_names:
        batch = batch.append_column("jaccard", pa.array(np.full(batch.num_rows, np.nan)))
    reason, step, target, jaccard = (batch[c].combine_chunks() for c in ("reason", "step", "duplicate_of", "jaccard"))

    def survivor_of(column: pa.Array, allowed: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
        found = pc.index_in(column, value_set=removed["id"])
        rows = pc.fill_null(found, 0)
        return (
            pc.and_(pc.is_valid(found), allowed),
            removed["duplicate_of"].take(rows).cast(target.type),
            removed["jaccard"].take(rows),
        )

    near, survivor, near_jaccard = survivor_of(batch["id"].combine_chunks(), pc.equal(reason, ""))
    onward, onward_survivor, onward_jaccard = survivor_of(target, pc.equal(reason, "exact duplicate"))
    columns = {
        "duplicate_of": pc.if_else(onward, onward_survivor, pc.if_else(near, survivor, target)),
        "jaccard": pc.if_else(onward, onward_jaccard, pc.if_else(near, near_jaccard, jaccard)),
        "reason": pc.if_else(near, pa.scalar("near duplicate", reason.type), reason),
        "step": pc.if_else(near, pa.scalar("fuzzy_dedup", step.type), step),
    }
    for name, column in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, column)
    return batch


def _mark_near_duplicates(batch: pa.Table, removed_ref) -> pa.Table:
    return mark_near_duplicates(batch, ray.get(removed_ref))


def candidate_pairs(ds: ray.data.Dataset, dedup: DedupConfig, batch: int, split: list[int]) -> np.ndarray:
    """(n, 2) int64 document keys that share an LSH bucket, a < b, distinct."""
    bands, rows = lsh_params(dedup.threshold, dedup.num_perm, dedup.recall_weight)
    candidates = (
        ds.map_batches(
            band_rows,
            batch_format="pyarrow",
            batch_size=batch,
            fn_kwargs={"num_perm": dedup.num_perm, "ngram": dedup.ngram, "bands": bands, "rows": rows},
        )
        .sort(["band_key", "doc"], boundaries=split)
        .map_batches(bucket_pairs, batch_format="pyarrow", batch_size=None, fn_kwargs={"star_above": STAR_ABOVE})
    )
    tables = [t for t in ray.get(candidates.to_arrow_refs()) if t.num_rows]  # (an empty block may have no columns)
    pairs = [np.stack([t["a"].to_numpy(), t["b"].to_numpy()], axis=1) for t in tables]
    log.info("fuzzy dedup: %d bands x %d rows", bands, rows)
    return unique_rows(np.concatenate([np.zeros((0, 2), dtype=np.int64), *pairs]))


def groups(ds: ray.data.Dataset, pairs: np.ndarray, dedup: DedupConfig, batch: int, split: list[int]) -> pa.Table:
    """Every document that has a verified near duplicate (SURVIVOR_SCHEMA)."""
    components = component_keys(pairs)
    sides = {"pairs_ref": ray.put((pairs[:, 0].copy(), pairs[:, 1].copy(), components)), "ngram": dedup.ngram}
    chosen = (
        ds.map_batches(pair_sides, batch_format="pyarrow", batch_size=batch, fn_kwargs=sides)
        .sort(["component", "a", "b"], boundaries=split)
        .map_batches(
            verify_and_choose,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"threshold": dedup.threshold, "mode": dedup.survivors},
        )
    )
    tables = [t for t in ray.get(chosen.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else SURVIVOR_SCHEMA.empty_table()


def fuzzy_dedup(ds: ray.data.Dataset, dedup: DedupConfig) -> tuple[ray.data.Dataset, dict]:
    """Marks near duplicates (reason "near duplicate", duplicate_of = a kept document, with their Jaccard);
    returns the marked dataset and figures for stats.json."""
    start = time.perf_counter()
    ds = ds.materialize()  # read three times below
    batch = rows_per_batch(ds)
    split = even_split(-(-ds.count() // batch))
    pairs = candidate_pairs(ds, dedup, batch, split)
    grouped = groups(ds, pairs, dedup, batch, split) if len(pairs) else SURVIVOR_SCHEMA.empty_table()
    removed = grouped.filter(pc.not_equal(grouped["duplicate_of"], ""))
    sizes = np.array(list(pc.value_counts(grouped["group"]).field("counts").to_pylist()) or [0])
    report = {
        "survivors": dedup.survivors,
        "candidate_pairs": len(pairs),
        "components": int((sizes > 0).sum()),  # groups of chained near duplicates
        "component_size_max": int(sizes.max()),
        "component_size_p99": float(np.percentile(sizes, 99)),
        "removed": removed.num_rows,
        "removed_without_kept_neighbour": removed.num_rows - int(pc.sum(removed["has_kept_neighbour"]).as_py() or 0),
    }
    log.info(
        "fuzzy dedup: %d candidate pairs; %d near duplicates in %d components, %d without a kept near duplicate "
        "(%.1f s)",
        len(pairs),
        removed.num_rows,
        report["components"],
        report["removed_without_kept_neighbour"],
        time.perf_counter() - start,
    )
    marked = ds.map_batches(
        _mark_near_duplicates, batch_format="pyarrow", batch_size=batch, fn_kwargs={"removed_ref": ray.put(removed)}
    )
    return marked, report

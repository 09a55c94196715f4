"""Exact dedup: rows whose normalized texts are equal keep only the lowest id.

Each row gets a 128-bit digest (two int64 columns); sorting on it puts every copy of a text in one block,
which can decide alone; nothing is gathered in the driver. The digests are hashes, so the sort cuts them
into even ranges without sampling the data first, and the blocks stay Arrow throughout.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.curate.arrow_text import utf8_bytes
from pipeline.curate.dedup_fuzzy import even_split
from pipeline.curate.records import STRING, is_kept, reject, set_column
from pipeline.runtime import rows_per_batch

DIGEST = ["digest_high", "digest_low"]


def add_digest(batch: pa.Table) -> pa.Table:
    """The digest of each kept row's UTF-8 text; a rejected row, which is no one's copy, gets its id's (so
    rejected rows spread over the sort's ranges like the rest)."""
    kept, texts, ids = is_kept(batch).to_pylist(), _utf8(batch["text"]), _utf8(batch["id"])
    digests = b"".join(
        hashlib.blake2b(text if k else b"rejected:" + rid, digest_size=16).digest()
        for text, rid, k in zip(texts, ids, kept)
    )
    both = np.frombuffer(digests, np.int64).reshape(-1, 2)
    return batch.append_column(DIGEST[0], pa.array(both[:, 0])).append_column(DIGEST[1], pa.array(both[:, 1]))


def _utf8(column: pa.ChunkedArray | pa.Array) -> list[memoryview]:
    """Each row's UTF-8 bytes, as views of the column's buffer (no Python strings made)."""
    data, ends = utf8_bytes(column)
    view = memoryview(data)
    return [view[start:end] for start, end in zip(ends[:-1].tolist(), ends[1:].tolist())]


def mark_exact_duplicates(block: pa.Table) -> pa.Table:
    """Within a block holding every copy of its texts: each kept copy whose id is not the lowest of its
    copies' is a duplicate of that lowest id."""
    kept = pc.indices_nonzero(is_kept(block))
    rows = block.select([*DIGEST, "id"]).take(kept)
    order = pc.sort_indices(rows, sort_keys=[(DIGEST[0], "ascending"), (DIGEST[1], "ascending"), ("id", "ascending")])
    high, low = (rows[c].take(order).to_numpy() for c in DIGEST)
    copy = np.zeros(len(high), bool)  # of the row before: the same text
    copy[1:] = (high[1:] == high[:-1]) & (low[1:] == low[:-1])
    first = np.maximum.accumulate(np.where(copy, 0, np.arange(len(copy))))  # each row's first copy: lowest id
    ids = rows["id"].take(order)
    lowest = ids.take(pa.array(first, pa.int64()))
    duplicate = pc.not_equal(ids, lowest).to_numpy(zero_copy_only=False)
    if not duplicate.any():
        return block
    at = kept.to_numpy()[order.to_numpy()][duplicate]  # the block rows that are duplicates
    hit = np.zeros(block.num_rows, bool)
    hit[at] = True
    sorted_row = np.zeros(block.num_rows, np.int64)  # of each duplicate, among the sorted kept rows
    sorted_row[at] = np.flatnonzero(duplicate)
    hit = pa.array(hit)
    block = set_column(block, "duplicate_of", pc.if_else(hit, lowest.take(sorted_row), block["duplicate_of"]))
    block = set_column(block, "jaccard", pc.if_else(hit, 1.0, block["jaccard"]))
    return reject(block, pc.if_else(hit, pa.scalar("exact duplicate", STRING), pa.scalar("", STRING)), "exact_dedup")


def exact_dedup(ds: ray.data.Dataset) -> ray.data.Dataset:
    ds = ds.materialize()
    batch, rows = rows_per_batch(ds), ds.count()
    ds = ds.map_batches(add_digest, batch_format="pyarrow", batch_size=batch)
    ds = ds.sort(DIGEST, boundaries=even_split(-(-rows // batch)))
    return ds.map_batches(mark_exact_duplicates, batch_format="pyarrow", batch_size=None).drop_columns(DIGEST)

"""Exact dedup: rows whose normalized texts are equal keep only the lowest id.

Each kept row's text gets a 128-bit digest. The sort moves only (digest, id) rows, never the texts: it
puts every copy of a text in one block, which decides alone which copies lose; what reaches the driver
is one row per losing copy, which a last map marks in the blocks. The digests are hashes, so the sort
cuts them into even ranges without sampling the data first.
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
COPIES_SCHEMA = pa.schema([("copy", pa.large_binary()), ("id", STRING), ("duplicate_of", STRING)])


def digests(texts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, 2) int64: the blake2b-128 digest of each text's UTF-8 bytes."""
    data, ends = utf8_bytes(texts)
    view = memoryview(data)
    joined = b"".join(
        hashlib.blake2b(view[start:end], digest_size=16).digest()
        for start, end in zip(ends[:-1].tolist(), ends[1:].tolist())
    )
    return np.frombuffer(joined, np.int64).reshape(-1, 2)


def copy_keys(both: np.ndarray, ids: pa.Array) -> pa.Array:
    """What names one row of one text: its digest's 16 bytes, then its id (ids alone may repeat)."""
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(both), [None, pa.py_buffer(both.tobytes())])
    return pc.binary_join_element_wise(
        fixed.cast(pa.large_binary()), ids.cast(pa.large_binary()), pa.scalar(b"", pa.large_binary())
    )


def digest_rows(batch: pa.Table) -> pa.Table:
    """The kept rows' digests and ids: what the sort moves."""
    rows = batch.select(["id", "text"]).filter(is_kept(batch))
    both = digests(rows["text"])
    return pa.table({DIGEST[0]: both[:, 0], DIGEST[1]: both[:, 1], "id": rows["id"]})


def losing_copies(block: pa.Table) -> pa.Table:
    """Within a block of digest_rows holding every copy of its texts: the copies whose id is not the lowest
    of their text's, each with that lowest id (COPIES_SCHEMA: `copy` names the row, `id` is its id alone)."""
    if not block.num_rows:
        return COPIES_SCHEMA.empty_table()
    order = pc.sort_indices(block, sort_keys=[(DIGEST[0], "ascending"), (DIGEST[1], "ascending"), ("id", "ascending")])
    high, low = (block[c].take(order).to_numpy() for c in DIGEST)
    copy = np.zeros(len(high), bool)  # of the row before: the same text
    copy[1:] = (high[1:] == high[:-1]) & (low[1:] == low[:-1])
    first = np.maximum.accumulate(np.where(copy, 0, np.arange(len(copy))))  # each row's first copy: lowest id
    ids = block["id"].take(order).combine_chunks()
    lowest = ids.take(pa.array(first, pa.int64()))
    losing = pc.not_equal(ids, lowest)
    both = np.stack([high, low], axis=1)[losing.to_numpy(zero_copy_only=False)]
    return pa.table(
        {
            "copy": copy_keys(both, ids.filter(losing)),
            "id": ids.filter(losing).cast(STRING),
            "duplicate_of": lowest.filter(losing).cast(STRING),
        },
        schema=COPIES_SCHEMA,
    )


def mark_exact_duplicates(batch: pa.Table, copies: pa.Table) -> pa.Table:
    """Reject the kept rows that `copies` (losing_copies' rows) lists, each pointing at its lowest id. Only the
    rows whose id a losing copy has are hashed again (on bench/curate.py's corpus, 44% of them)."""
    if not copies.num_rows:
        return batch
    kept = pc.indices_nonzero(pc.and_(is_kept(batch), pc.is_in(batch["id"], value_set=copies["id"])))
    if not len(kept):
        return batch
    rows = batch.select(["id", "text"]).take(kept)
    found = pc.index_in(copy_keys(digests(rows["text"]), rows["id"].combine_chunks()), value_set=copies["copy"])
    if not pc.any(pc.is_valid(found)).as_py():
        return batch
    at = np.full(batch.num_rows, -1, np.int64)  # each block row's entry in `copies`, -1 for none
    at[kept.to_numpy()] = pc.fill_null(found, -1).to_numpy()
    hit = pa.array(at >= 0)
    survivor = copies["duplicate_of"].take(pa.array(np.maximum(at, 0)))
    batch = set_column(batch, "duplicate_of", pc.if_else(hit, survivor, batch["duplicate_of"]))
    batch = set_column(batch, "jaccard", pc.if_else(hit, 1.0, batch["jaccard"]))
    return reject(batch, pc.if_else(hit, pa.scalar("exact duplicate", STRING), pa.scalar("", STRING)), "exact_dedup")


def _mark_exact_duplicates(batch: pa.Table, copies_ref) -> pa.Table:
    return mark_exact_duplicates(batch, ray.get(copies_ref))


def exact_dedup(ds: ray.data.Dataset) -> ray.data.Dataset:
    ds = ds.materialize()  # read twice: for the digests, then to mark
    batch, rows = rows_per_batch(ds), ds.count()
    losing = (
        ds.map_batches(digest_rows, batch_format="pyarrow", batch_size=batch)
        .sort([*DIGEST, "id"], boundaries=even_split(-(-rows // batch)))
        .map_batches(losing_copies, batch_format="pyarrow", batch_size=None)
    )
    tables = [t for t in ray.get(losing.to_arrow_refs()) if t.num_rows]  # (an empty block may have no columns)
    copies = pa.concat_tables(tables) if tables else COPIES_SCHEMA.empty_table()
    return ds.map_batches(
        _mark_exact_duplicates, batch_format="pyarrow", batch_size=batch, fn_kwargs={"copies_ref": ray.put(copies)}
    )

"""The row every curate step reads and writes, and the one way a step rejects rows.

A row is kept while its `reason` is "" (strings rather than nulls keep Arrow schemas identical
across blocks). A step never removes a row: it sets `reason` (a sentence for people) and `step`
(its own name, for counting) and passes the row on, so the end of the run writes it to rejected/.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def record(
    id: str,
    text: str = "",
    source: str = "",
    meta: str = "",
    raw: str = "",
    reason: str = "",
    step: str = "",
    html: str = "",
) -> dict:
    """`meta`: the input fields kept by data.keep_fields, as JSON ("" when none).
    `duplicate_of` and `jaccard`: the kept document a duplicate was removed for, and their similarity.
    `augmented_from`: set only on rows that augmentation made (curate/augment.py).
    `html`: a web page whose text the extract step has yet to take out (curate/web.py); it drops the column."""
    return {
        "id": id,
        "text": text,
        "source": source,
        "meta": meta,
        "raw": raw,
        "reason": reason,
        "step": step,
        "duplicate_of": "",
        "jaccard": float("nan"),
        "augmented_from": "",
        "html": html,
    }


STRING = pa.large_string()  # what Ray Data makes of pandas' strings: every block has the same schema
SCHEMA = pa.schema([(name, pa.float64() if name == "jaccard" else STRING) for name in record("")])


def table(rows: list[dict]) -> pa.Table:
    """Records as an Arrow block."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def from_pandas(batch: pd.DataFrame) -> pa.Table:
    """A pandas batch as an Arrow block. Arrow reads pandas' NaN as null; `jaccard` keeps NaN for "none", as
    every other block has it (a null there turns the column into pickled objects in later pandas steps)."""
    block = pa.Table.from_pandas(batch, preserve_index=False)
    return set_column(block, "jaccard", pc.fill_null(block["jaccard"], float("nan")))


def set_column(batch: pa.Table, name: str, values) -> pa.Table:
    return batch.set_column(batch.schema.get_field_index(name), name, values)


def read_reject(rid: str, source: str, reason: str, raw: str = "", meta: str = "") -> dict:
    """A row a reader could not make a document of: rejected by the step "read", with what it read as `raw`."""
    return record(rid, source=source, meta=meta, raw=raw, reason=reason, step="read")


def is_kept(batch):
    """Mask of the rows no step has rejected yet: a boolean Series of a pandas batch, an Array of an Arrow one."""
    return pc.equal(batch["reason"], "") if isinstance(batch, pa.Table) else batch["reason"] == ""


def reject(batch, reasons, step: str):
    """Reject the rows still kept whose entry in `reasons` is not "" (rows rejected earlier keep their
    reason and step). A pandas batch takes a list; an Arrow batch an Array, and is marked in Arrow.
    Whole columns are replaced: a partial .loc write into an Arrow-backed string column copies the
    column per write (a 30 MB file took 37 s and 20 GB that way)."""
    if isinstance(batch, pa.Table):
        hit = pc.and_(is_kept(batch), pc.not_equal(reasons, ""))
        batch = set_column(batch, "reason", pc.if_else(hit, reasons, batch["reason"]))
        return set_column(batch, "step", pc.if_else(hit, pa.scalar(step, STRING), batch["step"]))
    hit = [old == "" and new != "" for old, new in zip(batch["reason"].tolist(), reasons)]
    batch["reason"] = [new if h else old for h, new, old in zip(hit, reasons, batch["reason"].tolist())]
    batch["step"] = [step if h else old for h, old in zip(hit, batch["step"].tolist())]
    return batch

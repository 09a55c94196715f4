"""The row every curate step reads and writes, and the one way a step rejects rows.

A row is kept while its `reason` is "" (strings rather than nulls keep Arrow schemas identical
across blocks). A step never removes a row: it sets `reason` (a sentence for people) and `step`
(its own name, for counting) and passes the row on, so the end of the run writes it to rejected/.
"""

from __future__ import annotations

import pandas as pd


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


def read_reject(rid: str, source: str, reason: str, raw: str = "", meta: str = "") -> dict:
    """A row a reader could not make a document of: rejected by the step "read", with what it read as `raw`."""
    return record(rid, source=source, meta=meta, raw=raw, reason=reason, step="read")


def is_kept(batch) -> pd.Series:
    """Boolean mask of the rows no step has rejected yet (pandas batch)."""
    return batch["reason"] == ""


def reject(batch: pd.DataFrame, reasons: list[str], step: str) -> pd.DataFrame:
    """Reject the rows still kept whose entry in `reasons` is not "" (rows rejected earlier keep their
    reason and step). Whole columns are replaced: a partial .loc write into an Arrow-backed string
    column copies the column per write (a 30 MB file took 37 s and 20 GB that way)."""
    hit = [old == "" and new != "" for old, new in zip(batch["reason"].tolist(), reasons)]
    batch["reason"] = [new if h else old for h, new, old in zip(hit, reasons, batch["reason"].tolist())]
    batch["step"] = [step if h else old for h, old in zip(hit, batch["step"].tolist())]
    return batch

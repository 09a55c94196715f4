"""The row schema every curate step reads and writes."""
from __future__ import annotations

# reason == "" means the row is (still) kept; strings rather than nulls keep Arrow
# schemas identical across blocks.
COLUMNS = ("id", "text", "source", "meta", "raw", "reason", "duplicate_of", "augmented_from")


def record(id: str, text: str = "", source: str = "", meta: str = "", raw: str = "", reason: str = "",
           duplicate_of: str = "") -> dict:
    """`meta`: the input fields kept by data.keep_fields, as JSON ("" when none).
    `augmented_from`: set only on rows that augmentation made (curate/augment.py)."""
    return {"id": id, "text": text, "source": source, "meta": meta, "raw": raw, "reason": reason,
            "duplicate_of": duplicate_of, "augmented_from": ""}


def is_kept(batch) -> "object":
    """Boolean mask of the rows no step has rejected yet (pandas batch)."""
    return batch["reason"] == ""

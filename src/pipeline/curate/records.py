"""The row schema every curate step reads and writes."""
from __future__ import annotations

# reason == "" means the row is (still) kept; strings rather than nulls keep Arrow
# schemas identical across blocks.
COLUMNS = ("id", "text", "source", "raw", "reason", "duplicate_of")


def record(id: str, text: str = "", source: str = "", raw: str = "", reason: str = "",
           duplicate_of: str = "") -> dict:
    return {"id": id, "text": text, "source": source, "raw": raw, "reason": reason,
            "duplicate_of": duplicate_of}


def is_kept(batch) -> "object":
    """Boolean mask of the rows no step has rejected yet (pandas batch)."""
    return batch["reason"] == ""

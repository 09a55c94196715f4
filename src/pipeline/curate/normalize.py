"""Text normalization: Unicode NFKC, tidy whitespace, optional lowercase.

`normalize_text` states the rule; `normalize_batch` applies it to a block in Arrow (curate/arrow_text.py),
which gives the same text, or in Python where Arrow's rule would differ (lowercasing: Arrow's Unicode case
mapping is not Python's)."""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curate import arrow_text
from pipeline.curate.records import STRING, is_kept, reject, set_column

_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str, lowercase: bool = False) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    text = _BLANKS.sub("\n\n", text).strip()
    return text.lower() if lowercase else text


def normalize_batch(batch: pa.Table, lowercase: bool = False) -> pa.Table:
    kept = is_kept(batch)
    if lowercase:
        rows = zip(batch["text"].to_pylist(), kept.to_pylist())
        normalized = pa.array([normalize_text(t, True) if k else t for t, k in rows], type=STRING)
    else:
        normalized = pc.if_else(kept, arrow_text.normalize(batch["text"]), batch["text"])
    batch = set_column(batch, "text", normalized)
    empty = pc.if_else(pc.equal(normalized, ""), pa.scalar("empty after normalization", STRING), pa.scalar("", STRING))
    return reject(batch, empty, "normalize")

"""Text normalization: Unicode NFKC, tidy whitespace, optional lowercase."""
from __future__ import annotations

import re
import unicodedata

import pandas as pd

from pipeline.curate.records import is_kept

_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str, lowercase: bool = False) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    text = _BLANKS.sub("\n\n", text).strip()
    return text.lower() if lowercase else text


def normalize_batch(batch: pd.DataFrame, lowercase: bool = False) -> pd.DataFrame:
    kept = is_kept(batch)
    batch.loc[kept, "text"] = [normalize_text(t, lowercase) for t in batch.loc[kept, "text"]]
    emptied = kept & (batch["text"] == "")
    batch.loc[emptied, "reason"] = "empty after normalization"
    return batch

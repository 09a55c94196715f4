"""Text normalization: Unicode NFKC, tidy whitespace, optional lowercase."""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

from pipeline.curate.records import is_kept, reject

_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str, lowercase: bool = False) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    text = _BLANKS.sub("\n\n", text).strip()
    return text.lower() if lowercase else text


def normalize_batch(batch: pd.DataFrame, lowercase: bool = False) -> pd.DataFrame:
    kept = is_kept(batch).tolist()
    texts = [normalize_text(t, lowercase) if k else t for t, k in zip(batch["text"].tolist(), kept)]
    batch["text"] = texts  # a whole-column write (see records.reject)
    return reject(batch, ["empty after normalization" if t == "" else "" for t in texts], "normalize")

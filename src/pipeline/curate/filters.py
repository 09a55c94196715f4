"""Quality filters. Each one only says keep (None) or drop (a reason)."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pipeline.curate.records import is_kept


@dataclass(frozen=True)
class MinWords:
    min_words: int

    def __call__(self, text: str) -> str | None:
        n = len(text.split())
        return None if n >= self.min_words else f"too short (< {self.min_words} words)"


def apply_filters(batch: pd.DataFrame, filters: list) -> pd.DataFrame:
    for f in filters:
        kept = is_kept(batch)
        batch.loc[kept, "reason"] = [f(t) or "" for t in batch.loc[kept, "text"]]
    return batch

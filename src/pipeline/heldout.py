"""The held-out split: 1 document in 20, picked by a hash of its id, is never trained on.

Training evaluates on it, the tokenizer and AWQ calibrate on the rest, and the quantization gate and
distillation's KL are measured on it. It depends on the id alone, so it is stable across runs, block
counts and cluster sizes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as pads

HELD_OUT_EVERY = 20


def is_held_out(doc_id: str) -> bool:
    return zlib.crc32(str(doc_id).encode()) % HELD_OUT_EVERY == 0


def split_texts(kept_dir: Path, limit: int, held_out: bool, keep: Callable[[dict], bool] | None = None) -> list[str]:
    """Up to `limit` curated texts from the training split, or from the held-out split that training
    never sees; `keep`: only the documents (rows of id, text, source, meta) it picks. Streams the Parquet
    folder; never loads it whole."""
    texts: list[str] = []
    columns = ["id", "text", "source", "meta"] if keep else ["id", "text"]
    for batch in pads.dataset(str(kept_dir), format="parquet").to_batches(columns=columns):
        for row in batch.to_pylist():
            if is_held_out(row["id"]) == held_out and (keep is None or keep(row)):
                texts.append(row["text"])
                if len(texts) == limit:
                    return texts
    return texts

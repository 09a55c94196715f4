"""The held-out split: 1 document in 20, picked by a hash of its id, is never trained on.

Training evaluates on it, the tokenizer and AWQ calibrate on the rest, and the quantization gate and
distillation's KL are measured on it. It depends on the id alone, so it is stable across runs, block
counts and cluster sizes.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pyarrow.dataset as pads

HELD_OUT_EVERY = 20


def is_held_out(doc_id: str) -> bool:
    return zlib.crc32(str(doc_id).encode()) % HELD_OUT_EVERY == 0


def split_texts(kept_dir: Path, limit: int, held_out: bool) -> list[str]:
    """Up to `limit` curated texts from the training split, or from the held-out split that training
    never sees. Streams the Parquet folder; never loads it whole."""
    texts: list[str] = []
    for batch in pads.dataset(str(kept_dir), format="parquet").to_batches(columns=["id", "text"]):
        for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if is_held_out(doc_id) == held_out:
                texts.append(text)
                if len(texts) == limit:
                    return texts
    return texts

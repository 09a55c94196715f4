"""Training data on Ray Data: tokenize curated text and pack it into fixed-length rows."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import ray
from transformers import AutoTokenizer


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def pack_batch(batch: pd.DataFrame, tokenizer_dir: str, seq_len: int) -> dict:
    """Concatenate documents (each ended by EOS) and cut the stream into seq_len rows; the tail
    shorter than a row is dropped, so no row carries padding."""
    tok = _tokenizer(tokenizer_dir)
    stream: list[int] = []
    for ids in tok(batch["text"].tolist(), add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    rows = len(stream) // seq_len
    return {"input_ids": np.asarray(stream[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)}


def packed_dataset(kept_dir: str, tokenizer_dir: str, seq_len: int) -> ray.data.Dataset:
    ds = ray.data.read_parquet(kept_dir, columns=["text"])
    return ds.map_batches(pack_batch, batch_format="pandas", batch_size=64,
                          fn_kwargs={"tokenizer_dir": tokenizer_dir, "seq_len": seq_len})

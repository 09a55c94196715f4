"""Training data on Ray Data: tokenize curated text and pack it into fixed-length rows."""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import ray
from transformers import AutoTokenizer

HELD_OUT_EVERY = 20  # 1 document in 20, picked by a hash of its id, is never trained on


def is_held_out(doc_id: str) -> bool:
    """Stable across runs, block counts and cluster sizes: it depends on the id alone."""
    return zlib.crc32(str(doc_id).encode()) % HELD_OUT_EVERY == 0


def split_texts(kept_dir: Path, limit: int, held_out: bool) -> list[str]:
    """Up to `limit` curated texts from the training split, or from the held-out split that
    training never sees (for perplexity and KL evaluation). Streams; never loads the folder."""
    texts: list[str] = []
    for batch in pads.dataset(str(kept_dir), format="parquet").to_batches(columns=["id", "text"]):
        for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if is_held_out(doc_id) == held_out:
                texts.append(text)
                if len(texts) == limit:
                    return texts
    return texts


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def pack_batch(batch: pd.DataFrame, tokenizer_dir: str, seq_len: int) -> dict:
    """Concatenate the training documents (each ended by EOS) and cut the stream into seq_len rows; the tail
    shorter than a row is dropped, so no row carries padding."""
    tok = _tokenizer(tokenizer_dir)
    batch = batch[~batch["id"].map(is_held_out)]
    if batch.empty:  # every document of this batch is held out
        return {"input_ids": np.zeros((0, seq_len), dtype=np.int64)}
    stream: list[int] = []
    for ids in tok(batch["text"].tolist(), add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    rows = len(stream) // seq_len
    return {"input_ids": np.asarray(stream[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)}


def packed_dataset(kept_dir: str, tokenizer_dir: str, seq_len: int) -> ray.data.Dataset:
    ds = ray.data.read_parquet(kept_dir, columns=["id", "text"])
    return ds.map_batches(pack_batch, batch_format="pandas", batch_size=64,
                          fn_kwargs={"tokenizer_dir": tokenizer_dir, "seq_len": seq_len})

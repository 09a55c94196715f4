"""MinHash signatures for a whole batch of documents at once, in numpy.

datasketch's `MinHash.update_batch` hashes every shingle with SHA-1 in a Python loop and permutes
with a 64-bit modulo; that loop is where a single-process dedup spends its time. Here:

- each distinct word of the batch is hashed once (blake2b, 64-bit; stable across processes);
- a shingle's hash combines its n word hashes with fixed odd multipliers (vectorized over the batch);
- the permutations are multiply-add-shift hashes ((a*h + b) mod 2^64) >> 32, a universal family
  that needs no modulo by a prime, applied to every shingle of the batch in a few numpy passes;
- `np.minimum.reduceat` takes each document's minimum per permutation.

The signature estimates Jaccard similarity exactly as datasketch's does (share of equal slots),
and the LSH bands x rows come from datasketch's own parameter search.
"""
from __future__ import annotations

import hashlib

import numpy as np

SEED = 1  # fixed: signatures must agree across workers and runs
PERM_CHUNK = 16  # permutations per numpy pass: bounds the temporary to 16 x shingles x 8 bytes


def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(SEED)
    a = gen.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = gen.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def _word_multipliers(ngram: int) -> np.ndarray:
    gen = np.random.default_rng(SEED + 1)
    return gen.integers(1, 2**63, size=ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """All word n-gram hashes of the batch, concatenated, and each document's start offset.
    A document shorter than n words is padded with words that hash to 0: one shingle of all its words."""
    vocab: dict[str, int] = {"": 0}  # id 0: the padding word
    word_ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for d, text in enumerate(texts):
        ids = [vocab.setdefault(w, len(vocab)) for w in text.split()]
        ids += [0] * (ngram - len(ids))
        word_ids += ids
        lengths[d] = len(ids)
    word_hash = np.fromiter((int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                             for w in vocab), dtype=np.uint64, count=len(vocab))
    word_hash[0] = 0
    words = word_hash[np.asarray(word_ids, dtype=np.int64)]
    n_starts = len(words) - ngram + 1
    combined = np.zeros(n_starts, dtype=np.uint64)
    for j, m in enumerate(_word_multipliers(ngram)):  # position-dependent: "a b" differs from "b a"
        combined += words[j:j + n_starts] * m
    doc_start = np.cumsum(lengths) - lengths
    pos_in_doc = np.arange(len(words)) - np.repeat(doc_start, lengths)
    last_start = np.repeat(lengths - ngram, lengths)
    valid = (pos_in_doc <= last_start)[:n_starts]
    counts = lengths - ngram + 1
    return combined[valid], np.cumsum(counts) - counts


def signatures(texts: list[str], num_perm: int, ngram: int) -> np.ndarray:
    """(documents, num_perm) uint32 MinHash signatures."""
    if not texts:
        return np.zeros((0, num_perm), dtype=np.uint32)
    hashes, offsets = shingle_hashes(texts, ngram)
    a, b = permutations(num_perm)
    out = np.empty((num_perm, len(texts)), dtype=np.uint32)
    # permutations x shingles, contiguous along shingles: reduceat then runs along memory
    permuted = np.empty((PERM_CHUNK, len(hashes)), dtype=np.uint64)
    for lo in range(0, num_perm, PERM_CHUNK):
        hi = min(lo + PERM_CHUNK, num_perm)
        chunk = permuted[:hi - lo]
        np.multiply(a[lo:hi, None], hashes[None, :], out=chunk)  # wraps mod 2^64, as intended
        chunk += b[lo:hi, None]
        chunk >>= np.uint64(32)
        out[lo:hi] = np.minimum.reduceat(chunk, offsets, axis=1)
    return out.T.copy()

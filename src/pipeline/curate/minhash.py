"""MinHash signatures for a whole batch of documents at once, in numpy, with one hash per shingle.

A single-process datasketch loop spends its time in three places: splitting and joining words
in Python, SHA-1 per shingle, and `num_perm` multiply-mod passes per shingle. Here:

- Words are hashed straight from the Arrow text buffer: word edges come from one comparison
  over the bytes, and each word's polynomial hash from one prefix sum (sum of byte * P^i,
  wrapping mod 2^64, shifted back by P^-start). No Python string is made.
- A shingle's hash combines its n word hashes with fixed odd multipliers (position-dependent).
- One Permutation Hashing (Li, Owen & Zhang, 2012): each shingle's mixed 64-bit hash picks one
  of `num_perm` bins and competes for that bin's minimum, so a document costs one pass over its
  shingles instead of `num_perm`. Bins left empty (documents with few shingles) copy a filled
  bin found by a fixed random probe order per bin: "optimal densification" (Shrivastava, 2017).
  Two documents then agree on a slot with probability equal to their Jaccard similarity, as
  with `num_perm` independent permutations, so datasketch's LSH parameters apply unchanged.

Everything is a fixed function of the text: signatures agree across workers, runs and batch
boundaries. Polynomial hashes mod 2^64 are not collision-proof against crafted input (e.g.
Thue-Morse strings); a collision can only merge two shingles, and candidates are verified.
"""

from __future__ import annotations

import numpy as np

from pipeline.curate.arrow_text import run_bounds, utf8_bytes

SEED = 1  # fixed: signatures must agree across workers and runs
# text hashed at once: its scratch arrays take ~34 bytes per byte of text, and stay in cache at this size
# (bench/curate.py's text: signatures 0.39-0.42 s per 30 MB with 1 MiB, 0.32 s with 256 KiB or 128 KiB)
CHUNK_BYTES = 1 << 18
EMPTY = np.iinfo(np.uint32).max
_P = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # the ASCII bytes str.split() splits on


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every input bit reaches every output bit."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class _Buffers:
    """Per-process scratch arrays and P^i / P^-i tables, grown on demand: fresh multi-megabyte
    arrays cost more in page faults than the arithmetic done in them."""

    def __init__(self) -> None:
        self.size = 0

    def reserve(self, n: int) -> _Buffers:
        if n > self.size:
            self.size = max(n, CHUNK_BYTES)
            self.power, self.inverse = _powers(_P, self.size + 1), _powers(pow(_P, -1, 2**64), self.size + 1)
            self.product = np.empty(self.size, dtype=np.uint64)
            self.prefix = np.empty(self.size + 1, dtype=np.uint64)
            self.in_word = np.empty(self.size, dtype=bool)
        return self


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1), mod 2^64."""
    factors = np.full(n, base, dtype=np.uint64)
    factors[0] = 1
    return np.cumprod(factors, dtype=np.uint64)


_BUF = _Buffers()


def _chunks(texts):
    """(first document, UTF-8 bytes, document offsets) for runs of at most CHUNK_BYTES of text
    (a longer document is a run alone). Working chunk by chunk keeps every temporary small enough
    to be reused from the heap: fresh pages cost more here than the arithmetic done in them."""
    data, offsets = utf8_bytes(texts)
    for lo, hi in run_bounds(offsets, CHUNK_BYTES):
        yield lo, data[offsets[lo] : offsets[hi]], offsets[lo : hi + 1] - offsets[lo]


def word_hashes(texts) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word, concatenated, and each text's word count. Words are cut at ASCII
    whitespace, which is where `str.split()` cuts normalized text (normalize.py turns every other
    space into " "). `texts`: a list of str or an Arrow string array."""
    parts = [_word_hashes(data, offsets) for _, data, offsets in _chunks(texts)]
    return _concat(parts, np.uint64, np.int64)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]], *dtypes) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, dtype=dtypes[0]), np.zeros(0, dtype=dtypes[1])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _word_hashes(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(data)
    buf = _BUF.reserve(n)
    in_word = buf.in_word[:n]
    np.greater(data, 32, out=in_word)
    low = np.flatnonzero(data < 32)  # control bytes other than whitespace are word characters
    in_word[low[~_WHITESPACE[data[low]]]] = True
    edge = np.zeros(n + 1, dtype=bool)  # where a run of word or space bytes starts or ends
    edge[1:n] = in_word[1:] != in_word[:-1]
    edge[offsets] = True
    edges = np.flatnonzero(edge)
    is_start = in_word[edges[:-1]]
    starts, ends = edges[:-1][is_start], edges[1:][is_start]
    np.multiply(data, buf.power[:n], out=buf.product[:n])
    prefix = buf.prefix[: n + 1]
    prefix[0] = 0
    np.cumsum(buf.product[:n], out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * buf.inverse[starts]  # sum of byte * P^(i - start)
    return mix64(hashes), np.diff(np.searchsorted(starts, offsets))


def _word_multipliers(ngram: int) -> np.ndarray:
    gen = np.random.default_rng(SEED + 1)
    return gen.integers(1, 2**63, size=ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def shingle_hashes(texts, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """All word n-gram hashes of the batch, concatenated, and each document's start offset.
    A document shorter than n words is padded with words that hash to 0: one shingle of all its words."""
    hashes, counts = _concat(
        [_shingle_hashes(data, offsets, ngram) for _, data, offsets in _chunks(texts)], np.uint64, np.int64
    )
    return hashes, np.cumsum(counts) - counts


def _shingle_hashes(data: np.ndarray, offsets: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's shingle hashes and each document's shingle count."""
    words, lengths = _word_hashes(data, offsets)
    if (lengths < ngram).any():
        pad = np.maximum(ngram - lengths, 0)
        words = np.insert(words, np.repeat(np.cumsum(lengths), pad), np.uint64(0))
        lengths = lengths + pad
    n_starts = len(words) - ngram + 1
    combined = np.zeros(max(n_starts, 0), dtype=np.uint64)
    for j, m in enumerate(_word_multipliers(ngram)):  # position-dependent: "a b" differs from "b a"
        combined += words[j : j + n_starts] * m
    doc_start = np.cumsum(lengths) - lengths
    pos_in_doc = np.arange(len(words)) - np.repeat(doc_start, lengths)
    valid = (pos_in_doc <= np.repeat(lengths - ngram, lengths))[:n_starts]
    return combined[valid], lengths - ngram + 1


def _probe_order(num_perm: int) -> np.ndarray:
    """Row j: the order in which an empty bin j looks for a filled one (a random permutation per bin)."""
    gen = np.random.default_rng(SEED + 2)
    return np.stack([gen.permutation(num_perm) for _ in range(num_perm)])


def signatures(texts, num_perm: int, ngram: int) -> np.ndarray:
    """(documents, num_perm) uint32 MinHash signatures (one permutation hashing, densified)."""
    sig = np.full((len(texts), num_perm), EMPTY, dtype=np.uint32)
    for first, data, offsets in _chunks(texts):
        hashes, counts = _shingle_hashes(data, offsets, ngram)
        h = mix64(hashes)
        bins = (((h >> np.uint64(32)) * np.uint64(num_perm)) >> np.uint64(32)).astype(np.int64)
        doc = np.repeat(np.arange(first, first + len(counts)), counts)
        np.minimum.at(sig.reshape(-1), doc * num_perm + bins, (h & np.uint64(EMPTY)).astype(np.uint32))
    _densify(sig)
    return sig


def _densify(sig: np.ndarray) -> None:
    """Fill empty bins in place from filled ones of the same document (a minimum of exactly
    2^32 - 1 reads as empty: it then copies another bin, which both documents of a pair do alike)."""
    filled = sig != EMPTY
    doc, slot = np.nonzero(~filled)
    if not len(doc):
        return
    order = _probe_order(sig.shape[1])
    source = np.full(len(doc), -1)
    for step in range(sig.shape[1]):  # every bin is probed once: a document with any shingle ends
        todo = np.flatnonzero(source < 0)
        if not len(todo):
            break
        probe = order[slot[todo], step]
        hit = filled[doc[todo], probe]
        source[todo[hit]] = probe[hit]
    sig[doc, slot] = sig[doc, source]

"""Python's text rules as Arrow compute over whole columns: the curate steps' bulk work (normalization,
word counts, emptiness) runs in Arrow's C++ instead of a Python loop per document, with the same result.

"The same" is by construction, and tests/test_arrow_text.py checks it code point by code point:
- whitespace is the set Python's `str.isspace()` (and so `str.split()`, `str.strip()` and `re`'s `\\s`)
  uses, spelled out as an RE2 class: RE2's own `\\s` is ASCII-only;
- NFKC: Arrow's utf8proc may know a newer Unicode than this Python's `unicodedata`; the two agree on every
  character both know (Unicode's normalization stability), so only a text holding a code point this Python
  calls unassigned is normalized by Python instead; and a text made only of code points that NFKC leaves
  alone wherever they stand (`_nfkc_inert`, which this Python's unicodedata decides) is not normalized.
"""

from __future__ import annotations

import sys
import unicodedata
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _ranges(codes: list[int]) -> str:
    """An RE2 character-class body matching exactly `codes` (sorted), as \\x{..} ranges."""
    codes = np.asarray(codes, dtype=np.int64)
    if not len(codes):
        return ""
    cut = np.flatnonzero(np.diff(codes) != 1)
    starts, ends = codes[np.r_[0, cut + 1]].tolist(), codes[np.r_[cut, len(codes) - 1]].tolist()
    return "".join(f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b != a else "") for a, b in zip(starts, ends))


# every code point that str.isspace() accepts; numpy's isspace is that same CPython test, run in C over all of
# them at once (every Ray worker that normalizes builds these classes; a Python loop took 0.04 s of it)
SPACE_CODES = np.flatnonzero(np.char.isspace(np.arange(sys.maxunicode + 1, dtype=np.uint32).view("<U1"))).tolist()
SPACE = _ranges(SPACE_CODES)  # what Python calls whitespace
SPACE_NOT_NEWLINE = _ranges([c for c in SPACE_CODES if c != ord("\n")])
ODD_SPACE = _ranges([c for c in SPACE_CODES if c not in (ord("\n"), ord(" "))])
WIDE_SPACE = _ranges([c for c in SPACE_CODES if c > 127])


@cache
def _unassigned() -> str:
    """Code points this Python's unicodedata does not know (built once per process, on first use)."""
    return _ranges([c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cn"])


def is_blank(texts: pa.Array) -> pa.Array:
    """`not text.strip()` per row (null counts as blank)."""
    return pc.fill_null(pc.match_substring_regex(texts, f"^[{SPACE}]*$"), True)


def word_counts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`len(text.split())` per row (null: 0), counted on the UTF-8 bytes: a word starts at each byte that is
    not whitespace after one that is. That takes every whitespace character to be one ASCII byte; the rare
    rows holding one of Python's non-ASCII spaces (U+0085, U+00A0, U+3000, ...) are split by Arrow instead."""
    counts = []
    for chunk in texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]:
        chunk_counts = np.concatenate([np.zeros(0, np.int64), *map(_byte_word_counts, row_runs(chunk))])
        wide = pc.invert(pc.fill_null(pc.string_is_ascii(chunk), True))
        if pc.any(wide).as_py():
            rows = pc.indices_nonzero(wide)
            wide = pc.match_substring_regex(chunk.take(rows), f"[{WIDE_SPACE}]")
            rows = rows.filter(wide).to_numpy()
            chunk_counts[rows] = _split_word_counts(chunk.take(rows))
        counts.append(chunk_counts)
    return pa.array(np.concatenate(counts) if counts else [], pa.int64())


def row_runs(texts: pa.Array, target_bytes: int = 1 << 18) -> list[pa.Array]:
    """`texts` cut into runs of rows holding at most `target_bytes` of text each (a longer row is a run alone):
    numpy's temporaries over a run's bytes stay in cache and reuse memory the process has touched already.
    On 14 MB of bench/curate.py's text, word counts took 0.048 s whole, 0.019 s in runs of 1 MiB and 0.015 s
    in runs of 256 KiB; shingle fingerprint sets 0.193, 0.184 and 0.140 s."""
    return [texts.slice(lo, hi - lo) for lo, hi in run_bounds(utf8_bytes(texts)[1], target_bytes)]


def run_bounds(ends: np.ndarray, target_bytes: int) -> list[tuple[int, int]]:
    """(first row, end row) of consecutive runs of rows, each holding at most `target_bytes` of text (a longer
    row is a run alone). `ends`: each row's start in the text bytes, with a final end (utf8_bytes')."""
    bounds, lo, n = [], 0, len(ends) - 1
    while lo < n:
        hi = int(np.searchsorted(ends, ends[lo] + target_bytes, side="right")) - 1
        hi = min(max(hi, lo + 1), n)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _byte_word_counts(chunk: pa.Array) -> np.ndarray:
    """Words per row where whitespace is one of Python's ASCII spaces (a non-ASCII byte is part of a word)."""
    data, ends = utf8_bytes(chunk)
    counts = np.zeros(len(chunk), np.int64)
    if not len(data):
        return counts
    # not a space: above " ", or a control character that Python does not call whitespace (comparisons, not
    # a lookup table: five times as fast)
    word = (data > 32) | (data < 9) | ((data > 13) & (data < 28))
    starts = word.copy()
    starts[1:] &= ~word[:-1]
    nonempty = ends[1:] > ends[:-1]
    firsts = ends[:-1][nonempty]
    starts[firsts] = word[firsts]  # a row's first byte starts a word whatever the row before ended with
    counts[nonempty] = np.add.reduceat(starts, firsts, dtype=np.int64)
    if chunk.null_count:  # a null row's bytes, if it has any, are no text
        counts[pc.is_null(chunk).to_numpy(zero_copy_only=False)] = 0
    return counts


def utf8_bytes(texts) -> tuple[np.ndarray, np.ndarray]:
    """The texts' UTF-8 bytes as one uint8 array (no copy for Arrow input) and each text's start in it, with
    a final end. `texts`: an Arrow string array (chunked or not) or a list of str."""
    arr = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if not isinstance(arr, pa.Array):
        arr = pa.array(arr, type=pa.large_string())
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def _split_word_counts(texts: pa.Array) -> np.ndarray:
    """Arrow's utf8_split_whitespace splits on the same characters as Python, but at each one: a run of n
    whitespace characters leaves n - 1 empty strings, which are not counted."""
    parts = pc.utf8_split_whitespace(texts)
    words = pc.not_equal(pc.list_flatten(parts), "").to_numpy(zero_copy_only=False)
    rows = pc.list_parent_indices(parts).to_numpy()
    return np.bincount(rows[words], minlength=len(texts))


def normalize(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """normalize.normalize_text (without lowercasing) per row: NFKC, one newline style, runs of other
    whitespace to one space, lines stripped, at most one blank line in a row, the whole stripped."""
    text = nfkc(texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts)
    if _holds(text, "\r"):
        text = pc.replace_substring(pc.replace_substring(text, "\r\n", "\n"), "\r", "\n")
    # each run of whitespace but newlines to one space: the runs that are not one space already
    text = pc.replace_substring_regex(text, f"[{SPACE_NOT_NEWLINE}]{{2,}}|[{ODD_SPACE}]", " ")
    text = pc.replace_substring_regex(text, " \n ?|\n ", "\n")  # strip the lines: their ends hold one space at most
    if _holds(text, "\n\n\n"):
        text = pc.replace_substring_regex(text, "\n{3,}", "\n\n")
    return pc.utf8_trim(text, " \n")  # the only whitespace left


def _holds(texts: pa.Array, pattern: str) -> bool:
    """Whether some row holds `pattern`, a string without regex syntax: RE2's search is ten times as fast as
    Arrow's match_substring."""
    return pc.any(pc.match_substring_regex(texts, pattern)).as_py()


def nfkc(texts: pa.Array) -> pa.Array:
    """unicodedata.normalize("NFKC") per row. A text of ASCII and other inert code points (_nfkc_inert) is its
    own NFKC: only the other rows are normalized, by Arrow, or by Python where a row holds a code point this
    Python does not know. On bench/curate.py's corpus, 0.78 -> 0.32 CPU-seconds: most of its non-ASCII text
    is accented letters, dashes and quotes, which NFKC keeps."""
    other = pc.invert(pc.string_is_ascii(texts))
    if not pc.any(other).as_py():
        return texts
    change = pc.replace_with_mask(other, other, pc.match_substring_regex(texts.filter(other), f"[^{_nfkc_inert()}]"))
    if not pc.any(change).as_py():
        return texts
    rows = texts.filter(change)
    known = pc.invert(pc.match_substring_regex(rows, f"[{_unassigned()}]"))
    normalized = pc.utf8_normalize(rows, "NFKC") if pc.all(known).as_py() else _python_nfkc(rows, known)
    return pc.replace_with_mask(texts, change, normalized)


# Hangul's vowel and trailing jamo compose with the syllable before them by rule, not by a decomposition
HANGUL_JAMO_THAT_COMPOSE = [*range(0x1161, 0x1176), *range(0x11A8, 0x11C3)]


@cache
def _nfkc_inert() -> str:
    """An RE2 class body of the code points, ASCII and the rest of the BMP, that NFKC leaves as they are
    wherever they stand: assigned, their own NFKC, of combining class 0, and never the second of a canonical
    pair (which can compose with the code point before it). A text made of them is in NFKC: the quick check
    of UAX #15 answers Yes for it. Built once per process from this Python's unicodedata (~0.03 s)."""
    seconds = set(HANGUL_JAMO_THAT_COMPOSE)
    for c in range(0x80, 0x10000):
        parts = unicodedata.decomposition(chr(c)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(int(parts[1], 16))
    inert = [
        c
        for c in range(0x80, 0x10000)
        if c not in seconds
        and not 0xD800 <= c < 0xE000  # surrogates: never in UTF-8 text
        and unicodedata.category(chr(c)) != "Cn"
        and unicodedata.combining(chr(c)) == 0
        and unicodedata.normalize("NFKC", chr(c)) == chr(c)
    ]
    return _ranges([*range(0x80), *inert])


def _python_nfkc(texts: pa.Array, known: pa.Array) -> pa.Array:
    """NFKC by Arrow where `known`, by Python elsewhere (rare: a code point newer than this Python)."""
    rows = zip(pc.utf8_normalize(texts, "NFKC").to_pylist(), texts.to_pylist(), known.to_pylist())
    return pa.array([arrow if k else unicodedata.normalize("NFKC", t) for arrow, t, k in rows], type=texts.type)

"""Python's text rules as Arrow compute over whole columns: the curate steps' bulk work (normalization,
word counts, emptiness) runs in Arrow's C++ instead of a Python loop per document, with the same result.

"The same" is by construction, and tests/test_arrow_text.py checks it code point by code point:
- whitespace is the set Python's `str.isspace()` (and so `str.split()`, `str.strip()` and `re`'s `\\s`)
  uses, spelled out as an RE2 class: RE2's own `\\s` is ASCII-only;
- NFKC: Arrow's utf8proc may know a newer Unicode than this Python's `unicodedata`; the two agree on every
  character both know (Unicode's normalization stability), so only a text holding a code point this Python
  calls unassigned is normalized by Python instead.
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
    out, start = [], None
    for i, code in enumerate(codes):
        if start is None:
            start = code
        if i + 1 == len(codes) or codes[i + 1] != code + 1:
            out.append(f"\\x{{{start:x}}}" + (f"-\\x{{{code:x}}}" if code != start else ""))
            start = None
    return "".join(out)


SPACE_CODES = [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]
SPACE = _ranges(SPACE_CODES)  # what Python calls whitespace
SPACE_NOT_NEWLINE = _ranges([c for c in SPACE_CODES if c != ord("\n")])
ODD_SPACE = _ranges([c for c in SPACE_CODES if c not in (ord("\n"), ord(" "))])


@cache
def _unassigned() -> str:
    """Code points this Python's unicodedata does not know (built once per process, on first use)."""
    return _ranges([c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cn"])


def is_blank(texts: pa.Array) -> pa.Array:
    """`not text.strip()` per row (null counts as blank)."""
    return pc.fill_null(pc.match_substring_regex(texts, f"^[{SPACE}]*$"), True)


def word_counts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`len(text.split())` per row. Arrow's utf8_split_whitespace splits on the same characters as Python,
    but at each one: a run of n whitespace characters leaves n - 1 empty strings, which are not counted.
    (A regex counting the words takes three times as long: one match per word.)"""
    counts = []
    for chunk in texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]:
        parts = pc.utf8_split_whitespace(chunk)
        words = pc.not_equal(pc.list_flatten(parts), "").to_numpy(zero_copy_only=False)
        rows = pc.list_parent_indices(parts).to_numpy()
        counts.append(np.bincount(rows[words], minlength=len(chunk)))
    return pa.array(np.concatenate(counts) if counts else [], pa.int64())


def normalize(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """normalize.normalize_text (without lowercasing) per row: NFKC, one newline style, runs of other
    whitespace to one space, lines stripped, at most one blank line in a row, the whole stripped."""
    text = nfkc(texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts)
    if pc.any(pc.match_substring(text, "\r")).as_py():
        text = pc.replace_substring(pc.replace_substring(text, "\r\n", "\n"), "\r", "\n")
    # each run of whitespace but newlines to one space: the runs that are not one space already
    text = pc.replace_substring_regex(text, f"[{SPACE_NOT_NEWLINE}]{{2,}}|[{ODD_SPACE}]", " ")
    text = pc.replace_substring_regex(text, " \n ?|\n ", "\n")  # strip the lines: their ends hold one space at most
    if pc.any(pc.match_substring(text, "\n\n\n")).as_py():
        text = pc.replace_substring_regex(text, "\n{3,}", "\n\n")
    return pc.utf8_trim(text, " \n")  # the only whitespace left


def nfkc(texts: pa.Array) -> pa.Array:
    """unicodedata.normalize("NFKC") per row. ASCII text is its own NFKC: only the other rows are normalized,
    by Arrow, or by Python where a row holds a code point this Python does not know."""
    other = pc.invert(pc.string_is_ascii(texts))
    if not pc.any(other).as_py():
        return texts
    rows = texts.filter(other)
    known = pc.invert(pc.match_substring_regex(rows, f"[{_unassigned()}]"))
    normalized = pc.utf8_normalize(rows, "NFKC") if pc.all(known).as_py() else _python_nfkc(rows, known)
    return pc.replace_with_mask(texts, other, normalized)


def _python_nfkc(texts: pa.Array, known: pa.Array) -> pa.Array:
    """NFKC by Arrow where `known`, by Python elsewhere (rare: a code point newer than this Python)."""
    rows = zip(pc.utf8_normalize(texts, "NFKC").to_pylist(), texts.to_pylist(), known.to_pylist())
    return pa.array([arrow if k else unicodedata.normalize("NFKC", t) for arrow, t, k in rows], type=texts.type)

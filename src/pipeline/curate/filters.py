"""Quality filters. Each one looks at one text and only says keep (None) or drop (a reason).

Thresholds follow the heuristics of Gopher (Rae et al. 2021) and datatrove's filters; every one is
a config key under `data.filters`, and 0 / an empty list turns a filter off.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import FiltersConfig
from pipeline.curate import arrow_text
from pipeline.curate.records import STRING, is_kept, reject


@dataclass(frozen=True)
class Length:
    min_words: int = 0
    max_words: int = 0
    min_chars: int = 0
    max_chars: int = 0

    def __call__(self, text: str) -> str | None:
        words, chars = len(text.split()), len(text)
        if words < self.min_words:
            return f"too short (< {self.min_words} words)"
        if self.max_words and words > self.max_words:
            return f"too long (> {self.max_words} words)"
        if chars < self.min_chars:
            return f"too short (< {self.min_chars} characters)"
        if self.max_chars and chars > self.max_chars:
            return f"too long (> {self.max_chars} characters)"
        return None

    def reasons(self, texts: pa.Array) -> pa.Array:
        """What __call__ says of each text, for a whole column at once (in Arrow). A bound of 0 drops nothing,
        so only the bounds that are set are checked (and words counted only if one of theirs is)."""
        words = arrow_text.word_counts(texts) if self.min_words or self.max_words else None
        chars = pc.utf8_length(texts) if self.min_chars or self.max_chars else None
        checks = [  # __call__'s order: the first check that fails names the reason
            (self.min_words, pc.less, words, f"too short (< {self.min_words} words)"),
            (self.max_words, pc.greater, words, f"too long (> {self.max_words} words)"),
            (self.min_chars, pc.less, chars, f"too short (< {self.min_chars} characters)"),
            (self.max_chars, pc.greater, chars, f"too long (> {self.max_chars} characters)"),
        ]
        out = pa.nulls(len(texts), STRING)
        for bound, fails, values, reason in reversed(checks):
            if bound:
                out = pc.if_else(fails(values, bound), pa.scalar(reason, STRING), out)
        return pc.fill_null(out, "")


@dataclass(frozen=True)
class Repetition:
    """Boilerplate and spam repeat themselves: the share of characters in lines that occur more
    than once, and the share of words covered by the most frequent word n-gram."""

    max_duplicate_line_chars: float = 0.3
    max_top_ngram_share: float = 0.2
    ngram: int = 3

    @property
    def on(self) -> bool:
        return bool(self.max_duplicate_line_chars or self.max_top_ngram_share)

    def __call__(self, text: str) -> str | None:
        if self.max_duplicate_line_chars:
            lines = [line for line in text.split("\n") if line.strip()]
            counts = Counter(lines)
            dup_chars = sum(len(line) for line in lines if counts[line] > 1)
            if lines and dup_chars / sum(map(len, lines)) > self.max_duplicate_line_chars:
                return f"repetitive (> {self.max_duplicate_line_chars:.0%} of characters in repeated lines)"
        if self.max_top_ngram_share:
            words = text.split()
            grams = Counter(tuple(words[i : i + self.ngram]) for i in range(len(words) - self.ngram + 1))
            gram, n = grams.most_common(1)[0] if grams else ((), 0)
            if n > 1 and n * len(" ".join(gram)) / len(text) > self.max_top_ngram_share:
                return f"repetitive (top {self.ngram}-gram covers > {self.max_top_ngram_share:.0%} of the text)"
        return None


@dataclass(frozen=True)
class SymbolRatio:
    """Markup, code dumps and link lists: too many symbol-only words or too few words with a letter."""

    max_symbol_words: float = 0.1
    min_alpha_words: float = 0.5

    @property
    def on(self) -> bool:
        return bool(self.max_symbol_words or self.min_alpha_words)

    def __call__(self, text: str) -> str | None:
        words = text.split()
        if not words:
            return None
        symbols = sum(1 for w in words if not any(c.isalnum() for c in w))
        if self.max_symbol_words and symbols / len(words) > self.max_symbol_words:
            return f"symbol ratio > {self.max_symbol_words:.0%} of words"
        alpha = sum(1 for w in words if any(c.isalpha() for c in w))
        if alpha / len(words) < self.min_alpha_words:
            return f"alphabetic words < {self.min_alpha_words:.0%}"
        return None


@dataclass(frozen=True)
class Script:
    """Keep text mostly written in the allowed scripts (Unicode name prefixes such as LATIN, CJK,
    CYRILLIC): a cheap language-family check that needs no model."""

    allowed: tuple[str, ...] = ()
    min_share: float = 0.5

    @property
    def on(self) -> bool:
        return bool(self.allowed)

    def __call__(self, text: str) -> str | None:
        if not self.allowed:
            return None
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return None
        inside = sum(1 for c in letters if unicodedata.name(c, "").split(" ")[0] in self.allowed)
        if inside / len(letters) < self.min_share:
            return f"script: < {self.min_share:.0%} of letters in {'/'.join(self.allowed)}"
        return None


def build_filters(settings: FiltersConfig) -> list:
    return [
        Length(settings.min_words, settings.max_words, settings.min_chars, settings.max_chars),
        Repetition(settings.max_duplicate_line_chars, settings.max_top_ngram_share),
        SymbolRatio(settings.max_symbol_words, settings.min_alpha_words),
        Script(tuple(s.upper() for s in settings.scripts), settings.min_script_share),
    ]


def first_reason(text: str, filters: list) -> str:
    """The reason of the first filter that drops the text ("" when every filter keeps it)."""
    return next((reason for f in filters if (reason := f(text))), "")


def apply_filters(batch: pa.Table, filters: list) -> pa.Table:
    """`filters`: build_filters' list, the length filter first. It runs over the whole column in Arrow, the
    others per text on the rows it keeps, and only those that are on. Rows rejected before are not looked at again."""
    length, others = filters[0], [f for f in filters[1:] if f.on]
    batch = reject(batch, length.reasons(batch["text"]), "filters")
    if others:
        rows = zip(batch["text"].to_pylist(), is_kept(batch).to_pylist())
        batch = reject(batch, pa.array([first_reason(t, others) if k else "" for t, k in rows], STRING), "filters")
    return batch

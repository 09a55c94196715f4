"""Exact Jaccard similarity join, the ground truth that fuzzy dedup is measured against.

All pairs of documents whose word n-gram shingle sets have Jaccard >= t, found exactly with prefix
filtering (Chaudhuri et al. 2006): order each set's shingles rarest first; two sets with
Jaccard >= t must share one of the first |S| - ceil(t*|S|) + 1 of them. Shingles are the 64-bit
hashes of curate/minhash.py (a collision is a 2^-64 event). Single process: for evaluation.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from pipeline.curate.minhash import shingle_hashes


def shingle_sets(texts: list[str], ngram: int) -> list[np.ndarray]:
    """Each text's distinct shingle hashes, sorted."""
    hashes, offsets = shingle_hashes(texts, ngram)
    return [np.unique(part) for part in np.split(hashes, offsets[1:])]


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Jaccard of two sorted sets from `shingle_sets`."""
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


def similar_pairs(ids: list[str], texts: list[str], ngram: int, threshold: float) -> set[tuple[str, str]]:
    """Every pair (a, b), a < b, whose exact shingle Jaccard is >= threshold."""
    sets = shingle_sets(texts, ngram)
    values, counts = np.unique(np.concatenate(sets), return_counts=True)
    index: dict[int, list[int]] = defaultdict(list)
    pairs: set[tuple[str, str]] = set()
    order = sorted(range(len(sets)), key=lambda d: len(sets[d]))  # length filter: only look back
    for d in order:
        s = sets[d]
        rarity = counts[np.searchsorted(values, s)]
        prefix = s[np.lexsort((s, rarity))][: len(s) - math.ceil(threshold * len(s)) + 1]
        candidates = {c for token in prefix.tolist() for c in index.get(token, ())}
        for c in candidates:
            other = sets[c]
            if len(other) < threshold * len(s):
                continue
            if jaccard(s, other) >= threshold:
                pairs.add(tuple(sorted((ids[d], ids[c]))))
        for token in prefix.tolist():
            index[token].append(d)
    return pairs


def dedup_quality(truth: set[tuple[str, str]], removed: set[str]) -> dict:
    """precision: share of removed documents that truly have a near-duplicate (Jaccard >= t) in the
    corpus. recall: share of true near-duplicate pairs of which at most one document survives.
    removed_without_kept_neighbour: removed documents that no kept document resembles (Jaccard >= t):
    their content is lost, not deduplicated."""
    has_twin = {x for pair in truth for x in pair}
    precision = len(removed & has_twin) / len(removed) if removed else 1.0
    caught = sum(1 for a, b in truth if a in removed or b in removed)
    recall = caught / len(truth) if truth else 1.0
    covered = {x for a, b in truth for x, other in ((a, b), (b, a)) if x in removed and other not in removed}
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "true_pairs": len(truth),
        "removed": len(removed),
        "removed_without_kept_neighbour": len(removed - covered),
    }

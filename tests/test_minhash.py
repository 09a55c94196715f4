"""The vectorized word hashing and one-permutation MinHash behind fuzzy dedup (no Ray needed)."""

import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.curate.dedup_fuzzy import lsh_params
from pipeline.curate.minhash import EMPTY, shingle_hashes, signatures, word_hashes

TEXTS = [
    "The quick  brown fox\njumps over the lazy dog.",
    "",
    "   ",
    "one",
    "é ü ß 中文 text",
    "a\x01b c\td",
    "tabs\tand\x1cfile\x1dseparators\x1e\x1fend",
    "the quick brown fox",
]


def test_words_are_cut_as_str_split_cuts_them_and_equal_words_hash_equal():
    hashes, counts = word_hashes(TEXTS)
    assert counts.tolist() == [len(t.split()) for t in TEXTS]
    words = [w for t in TEXTS for w in t.split()]
    by_word: dict[str, int] = {}
    for word, h in zip(words, hashes.tolist()):
        assert by_word.setdefault(word, h) == h
    assert len(set(by_word.values())) == len(by_word)  # no collisions among distinct words


def test_arrow_slices_and_lists_give_the_same_hashes():
    arr = pa.chunked_array([pa.array(TEXTS[:3]), pa.array(TEXTS[3:])]).slice(1)
    assert (word_hashes(arr)[0] == word_hashes(TEXTS[1:])[0]).all()
    assert (word_hashes(pa.array(TEXTS, pa.large_string()).slice(2))[0] == word_hashes(TEXTS[2:])[0]).all()


def test_text_hashed_in_chunks_hashes_the_same(monkeypatch):
    import pipeline.curate.minhash as minhash

    whole = word_hashes(TEXTS)
    monkeypatch.setattr(minhash, "CHUNK_BYTES", 7)  # smaller than some documents: those go alone
    chunked = word_hashes(TEXTS)
    assert (whole[0] == chunked[0]).all() and (whole[1] == chunked[1]).all()


def test_short_documents_get_one_padded_shingle():
    hashes, offsets = shingle_hashes(["a b", "a b c d e f", "x"], ngram=5)
    assert offsets.tolist() == [0, 1, 3] and len(hashes) == 4


def test_a_signature_does_not_depend_on_the_batch_it_is_in():
    alone = np.concatenate([signatures([t], 64, 5) for t in TEXTS])
    assert (alone == signatures(TEXTS, 64, 5)).all()
    assert (alone == signatures(TEXTS[::-1], 64, 5)[::-1]).all()
    assert (alone != EMPTY).all()  # densified: every slot holds a real minimum


def _edited(words: list[str], share: float, rng: random.Random) -> list[str]:
    return [f"edit{rng.random()}" if rng.random() < share else w for w in words]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = ({tuple(w[i : i + n]) for i in range(len(w) - n + 1)} for w in (a.split(), b.split()))
    return len(sa & sb) / len(sa | sb)


def test_equal_slots_estimate_jaccard_without_bias():
    """Over many pairs, the share of equal slots tracks exact Jaccard, for long documents and for
    short ones whose slots are mostly densified (fewer shingles than slots)."""
    rng = random.Random(0)
    for length in (600, 60):
        errors = []
        for _ in range(40):
            words = [f"w{rng.randrange(5000)}" for _ in range(length)]
            a, b = " ".join(words), " ".join(_edited(words, rng.choice([0.01, 0.03, 0.08]), rng))
            sig = signatures([a, b], 128, 5)
            errors.append((sig[0] == sig[1]).mean() - _jaccard(a, b))
        assert abs(np.mean(errors)) < 0.03, (length, np.mean(errors))
        assert np.std(errors) < 0.12, (length, np.std(errors))


@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_lsh_bands_and_rows_are_the_ones_datasketch_chooses(num_perm):
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.7, 0.8, 0.9):
        for weight in (0.5, 0.95):
            assert lsh_params(threshold, num_perm, weight) == _optimal_param(threshold, num_perm, 1 - weight, weight)

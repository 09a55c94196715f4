"""The curation rules as pure functions, table in, table out, without Ray: what each step rejects and
why, which exact copy survives, which candidate pairs a bucket makes, which pairs verification keeps,
and how near duplicates point at their survivor."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import FiltersConfig
from pipeline.curate.dedup_exact import add_digest, mark_exact_duplicates
from pipeline.curate.dedup_fuzzy import (
    STAR_ABOVE,
    UnionFind,
    bucket_pairs,
    fingerprint_sets,
    mark_near_duplicates,
    verify_pairs,
)
from pipeline.curate.filters import Length, Repetition, Script, SymbolRatio, apply_filters, build_filters
from pipeline.curate.normalize import normalize_batch
from pipeline.curate.records import record, reject

PROSE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software\n"
    "and associated documentation files, to deal in the Software without restriction."
)


def table(*rows: dict) -> pd.DataFrame:
    """A curate batch: every record() column, with the given fields set."""
    return pd.DataFrame([{**record(r["id"]), **r} for r in rows])


def test_reject_marks_only_rows_still_kept_and_records_the_step():
    batch = table(
        {"id": "a", "text": "x"},
        {"id": "b", "text": "y", "reason": "too short", "step": "filters"},
        {"id": "c", "text": "z"},
    )
    out = reject(batch, ["", "exact duplicate", "exact duplicate"], "exact_dedup")
    assert out["reason"].tolist() == ["", "too short", "exact duplicate"]
    assert out["step"].tolist() == ["", "filters", "exact_dedup"]


def test_normalize_rejects_text_that_normalizes_to_nothing():
    out = normalize_batch(
        table({"id": "a", "text": "  ｆｕｌｌ\u3000width  \r\n\r\n\r\n\r\nnext"}, {"id": "b", "text": " \u3000 \n "})
    )
    assert out["text"].tolist() == ["full width\n\nnext", ""]
    assert out[["reason", "step"]].values.tolist() == [["", ""], ["empty after normalization", "normalize"]]


def test_filters_give_the_first_reason_and_leave_earlier_rejections_alone():
    filters = build_filters(FiltersConfig())
    out = apply_filters(
        table(
            {"id": "prose", "text": PROSE},
            {"id": "short", "text": "two words"},
            {"id": "spam", "text": "buy now\n" * 10 + "stop"},
            {"id": "earlier", "text": "two words", "reason": "invalid utf-8", "step": "read"},
        ),
        filters,
    )
    assert out.set_index("id")[["reason", "step"]].to_dict("index") == {
        "prose": {"reason": "", "step": ""},
        "short": {"reason": "too short (< 5 words)", "step": "filters"},
        "spam": {"reason": "repetitive (> 30% of characters in repeated lines)", "step": "filters"},
        "earlier": {"reason": "invalid utf-8", "step": "read"},
    }


@pytest.mark.parametrize(
    "make, text, dropped",
    [
        (lambda: Length(min_words=3), "one two", "too short"),
        (lambda: Length(max_words=100), "word " * 101, "too long"),
        (lambda: Length(min_chars=20), "short words here", "too short"),
        (lambda: Repetition(), "buy now\nbuy now\nbuy now\nsomething else entirely", "repetitive"),
        (lambda: Repetition(max_duplicate_line_chars=0), "spam spam spam " * 20, "repetitive"),
        (lambda: SymbolRatio(), "### *** --- >>> text here", "symbol ratio"),
        (lambda: SymbolRatio(max_symbol_words=0), "12 34 56 78 90 text", "alphabetic words"),
        (lambda: Script(("LATIN",)), "Это текст на русском языке", "script"),
    ],
)
def test_each_filter_drops_what_it_should_and_keeps_prose(make, text, dropped):
    f = make()
    assert dropped in f(text)
    assert f(PROSE) is None


def test_the_lowest_kept_id_survives_an_exact_duplicate_group():
    block = add_digest(
        table(
            {"id": "b", "text": PROSE},
            {"id": "c", "text": PROSE},
            {"id": "a", "text": PROSE, "reason": "too short", "step": "filters"},
            {"id": "d", "text": "something else"},
        )
    )
    out = mark_exact_duplicates(block.sort_values("digest")).set_index("id")
    assert out.loc["c", ["reason", "step", "duplicate_of"]].tolist() == ["exact duplicate", "exact_dedup", "b"]
    assert out.loc["b", "reason"] == "" and out.loc["d", "reason"] == ""
    assert out.loc["a", ["reason", "duplicate_of"]].tolist() == ["too short", ""], "a rejected row is no survivor"


def bucket_block(buckets: dict[int, list[int]]) -> pa.Table:
    rows = sorted((key, doc) for key, docs in buckets.items() for doc in docs)
    return pa.table(
        {
            "band_key": np.array([k for k, _ in rows], dtype=np.int64),
            "doc": np.array([d for _, d in rows], dtype=np.int64),
        }
    )


def test_a_bucket_pairs_its_documents_once_each():
    out = bucket_pairs(bucket_block({1: [10, 11, 12], 2: [11, 12, 12], 3: [13]}))
    assert sorted(zip(out["a"].to_pylist(), out["b"].to_pylist())) == [(10, 11), (10, 12), (11, 12)]
    assert bucket_pairs(bucket_block({})).num_rows == 0


def test_a_large_bucket_pairs_every_member_with_its_lowest_only():
    members = list(range(100, 100 + STAR_ABOVE + 3))
    out = bucket_pairs(bucket_block({7: members}))
    assert sorted(zip(out["a"].to_pylist(), out["b"].to_pylist())) == [(100, m) for m in members[1:]]


def pair_block(pairs: list[tuple[str, str]], texts: dict[str, str], ngram: int = 2) -> pa.Table:
    """What pair_sides sends verification: both sides of each pair, sorted by pair."""
    rows = sorted((a, b, doc) for a, b in pairs for doc in (a, b))
    values, bounds = fingerprint_sets([texts[doc] for _, _, doc in rows], ngram)
    sets = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(rows), [None, pa.py_buffer(bounds * 4), pa.py_buffer(values)]
    )
    keys = {doc: i for i, doc in enumerate(sorted(texts))}
    return pa.table(
        {
            "a": [keys[a] for a, _, _ in rows],
            "b": [keys[b] for _, b, _ in rows],
            "id": [doc for _, _, doc in rows],
            "shingles": sets,
        }
    )


def test_verification_keeps_the_pairs_whose_jaccard_reaches_the_threshold():
    texts = {
        "x": "a b c d e f g h",
        "y": "a b c d e f g z",  # 2-gram Jaccard 6/8 = 0.75
        "z": "q r s t u v w p",
    }
    out = verify_pairs(pair_block([("x", "y"), ("x", "z")], texts), threshold=0.75)
    assert list(zip(out["a"].to_pylist(), out["b"].to_pylist())) == [("x", "y")]
    assert verify_pairs(pair_block([("x", "y")], texts), threshold=0.76).num_rows == 0


def test_union_find_roots_are_the_smallest_id():
    uf = UnionFind()
    for a, b in [("d", "c"), ("c", "b"), ("x", "y"), ("b", "e")]:
        uf.union(a, b)
    assert uf.roots() == {"d": "b", "c": "b", "b": "b", "e": "b", "x": "x", "y": "x"}


def test_near_duplicates_point_at_their_survivor_and_exact_copies_follow_on():
    batch = pa.Table.from_pandas(
        table(
            {"id": "a", "text": "t"},
            {"id": "b", "text": "t"},
            {"id": "b-copy", "text": "t", "reason": "exact duplicate", "step": "exact_dedup", "duplicate_of": "b"},
            {"id": "c", "text": "t", "reason": "too short", "step": "filters"},
        ),
        preserve_index=False,
    )
    out = mark_near_duplicates(batch, pa.array(["b", "c"]), pa.array(["a", "a"])).to_pandas().set_index("id")
    assert out[["reason", "step", "duplicate_of"]].to_dict("index") == {
        "a": {"reason": "", "step": "", "duplicate_of": ""},
        "b": {"reason": "near duplicate", "step": "fuzzy_dedup", "duplicate_of": "a"},
        "b-copy": {"reason": "exact duplicate", "step": "exact_dedup", "duplicate_of": "a"},
        "c": {"reason": "too short", "step": "filters", "duplicate_of": ""},
    }
    assert mark_near_duplicates(batch, pa.array([], pa.string()), pa.array([], pa.string())) is batch


@pytest.mark.parametrize("suffix, codec", [(".jsonl.zst", "zstd"), (".jsonl.gz", "gzip"), (".txt.zst", "zstd")])
def test_compressed_files_are_read_and_corrupt_ones_rejected(tmp_path, suffix, codec):
    from pipeline.curate.read import ReadOptions, read_file

    body = b'{"id": "a", "text": "one two three four five"}\n' if ".jsonl" in suffix else b"one two three four five"
    path = tmp_path / f"doc{suffix}"
    with pa.CompressedOutputStream(str(path), codec) as out:
        out.write(body)
    (rec,) = read_file({"path": str(path)}, ReadOptions())
    assert rec["text"] == "one two three four five" and rec["reason"] == ""
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(path.read_bytes()[:8] + b"garbage")
    (bad,) = read_file({"path": str(broken)}, ReadOptions())
    assert bad["reason"].startswith("unreadable file") and bad["id"] == str(broken)
    assert bad["step"] == "read"

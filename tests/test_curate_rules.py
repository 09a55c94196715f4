"""The curation rules as pure functions, table in, table out, without Ray: what each step rejects and
why, which exact copy survives, which candidate pairs a bucket makes, which pairs verification keeps,
and how near duplicates point at their survivor."""

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import FiltersConfig
from pipeline.curate import records
from pipeline.curate.dedup_exact import digest_rows, losing_copies, mark_exact_duplicates
from pipeline.curate.dedup_fuzzy import (
    STAR_ABOVE,
    bucket_pairs,
    choose_survivors,
    component_keys,
    component_roots,
    even_split,
    fingerprint_sets,
    mark_near_duplicates,
    verify_pairs,
)
from pipeline.curate.filters import Length, Repetition, Script, SymbolRatio, apply_filters, build_filters
from pipeline.curate.normalize import normalize_batch
from pipeline.curate.records import STRING, record, reject

PROSE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software\n"
    "and associated documentation files, to deal in the Software without restriction."
)


def table(*rows: dict) -> pd.DataFrame:
    """A curate batch: every record() column, with the given fields set."""
    return pd.DataFrame([{**record(r["id"]), **r} for r in rows])


def arrow(batch: pd.DataFrame) -> pa.Table:
    """The batch as the Arrow block the steps that work in Arrow take."""
    return records.table(batch.to_dict("records"))


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
    rows = table({"id": "a", "text": "  ｆｕｌｌ\u3000width  \r\n\r\n\r\n\r\nnext"}, {"id": "b", "text": " \u3000 \n "})
    out = normalize_batch(arrow(rows)).to_pandas()
    assert out["text"].tolist() == ["full width\n\nnext", ""]
    assert out[["reason", "step"]].values.tolist() == [["", ""], ["empty after normalization", "normalize"]]


def test_filters_give_the_first_reason_and_leave_earlier_rejections_alone():
    filters = build_filters(FiltersConfig())
    out = apply_filters(
        arrow(
            table(
                {"id": "prose", "text": PROSE},
                {"id": "short", "text": "two words"},
                {"id": "spam", "text": "buy now\n" * 10 + "stop"},
                {"id": "earlier", "text": "two words", "reason": "invalid utf-8", "step": "read"},
            )
        ),
        filters,
    ).to_pandas()
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


@pytest.mark.parametrize("bounds", list(itertools.product((0, 3), (0, 4), (0, 12), (0, 20))))
def test_the_length_filter_on_a_column_says_what_it_says_of_each_text(bounds):
    """Bounds of 0 are off and are not checked at all on the column; the reasons stay the per-text ones."""
    length = Length(*bounds)
    texts = ["", "one", "one two three", "one two three four five", "a\u3000b c", "x" * 25, "  spaced  out  "]
    assert length.reasons(pa.array(texts, STRING)).to_pylist() == [length(t) or "" for t in texts]


def exact_dedup_in_one_block(block: pa.Table) -> pa.Table:
    """exact_dedup's three functions on a block that holds every copy of its texts (the sort's job)."""
    return mark_exact_duplicates(block, losing_copies(digest_rows(block)))


def test_the_lowest_kept_id_survives_an_exact_duplicate_group():
    block = arrow(
        table(
            {"id": "c", "text": PROSE},
            {"id": "b", "text": PROSE},
            {"id": "a", "text": PROSE, "reason": "too short", "step": "filters"},
            {"id": "d", "text": "something else"},
            {"id": "e", "text": PROSE},
        )
    )
    out = exact_dedup_in_one_block(block).to_pandas().set_index("id")
    assert out.loc["c", ["reason", "step", "duplicate_of", "jaccard"]].tolist() == [
        "exact duplicate",
        "exact_dedup",
        "b",
        1.0,
    ]
    assert out.loc["e", ["reason", "duplicate_of"]].tolist() == ["exact duplicate", "b"]
    assert out.loc["b", "reason"] == "" and out.loc["d", "reason"] == ""
    assert out.loc["a", ["reason", "duplicate_of"]].tolist() == ["too short", ""], "a rejected row is no survivor"
    for rows in ([False, True, False, True, False], [False, False, True, False, False], [False] * 5):
        few = block.filter(pa.array(rows))  # no copies; one rejected row; an empty block
        assert exact_dedup_in_one_block(few)["reason"].to_pylist() == few["reason"].to_pylist()


def test_an_exact_copy_is_named_by_its_text_and_id_so_a_repeated_id_marks_only_the_copy():
    """Input ids may repeat: "x" is the id of a copy of "a"'s text and of another text no one copies; only
    the copy loses. What the sort moves and what reaches the driver are digests and ids, never texts."""
    block = arrow(
        table(
            {"id": "a", "text": PROSE},
            {"id": "x", "text": PROSE},
            {"id": "x", "text": "a text of its own"},
        )
    )
    moved = digest_rows(block)
    assert moved.column_names == ["digest_high", "digest_low", "id"]
    copies = losing_copies(moved)
    assert copies.column_names == ["copy", "id", "duplicate_of"] and copies["duplicate_of"].to_pylist() == ["a"]
    out = mark_exact_duplicates(block, copies)
    assert out["reason"].to_pylist() == ["", "exact duplicate", ""]
    assert out["duplicate_of"].to_pylist() == ["", "a", ""]


def bucket_block(buckets: dict[int, list[int]]) -> pa.Table:
    rows = sorted((key, doc) for key, docs in buckets.items() for doc in docs)
    return pa.table(
        {
            "band_key": np.array([k for k, _ in rows], dtype=np.int64),
            "doc": np.array([d for _, d in rows], dtype=np.int64),
        }
    )


@pytest.mark.parametrize("parts", [0, 1, 2, 5])
def test_the_sorts_always_get_boundaries_that_cut_hash_space_evenly(parts):
    """Two ranges at least: a sort given no boundary samples its own over every key (test_curate.py)."""
    bounds = even_split(parts)
    assert len(bounds) == max(parts, 2) - 1 and bounds == sorted(bounds)
    widths = np.diff([-(2.0**63), *bounds, 2.0**63])
    assert np.allclose(widths, 2.0**64 / len(widths))


def test_a_bucket_pairs_its_documents_once_each():
    out = bucket_pairs(bucket_block({1: [10, 11, 12], 2: [11, 12, 12], 3: [13]}))
    assert sorted(zip(out["a"].to_pylist(), out["b"].to_pylist())) == [(10, 11), (10, 12), (11, 12)]
    assert bucket_pairs(bucket_block({})).num_rows == 0


def test_a_large_bucket_pairs_every_member_with_its_lowest_only():
    members = list(range(100, 100 + STAR_ABOVE + 3))
    out = bucket_pairs(bucket_block({7: members}))
    assert sorted(zip(out["a"].to_pylist(), out["b"].to_pylist())) == [(100, m) for m in members[1:]]


def pair_block(pairs: list[tuple[str, str]], texts: dict[str, str], ngram: int = 2) -> pa.Table:
    """What pair_sides sends verification: both sides of each pair (b's side first, as a sort may leave
    them), sorted by pair."""
    keys = {doc: i for i, doc in enumerate(sorted(texts))}
    rows = sorted((keys[a], keys[b], side, doc) for a, b in pairs for side, doc in ((1, b), (0, a)))
    values, bounds = fingerprint_sets([texts[doc] for _, _, _, doc in rows], ngram)
    sets = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(rows), [None, pa.py_buffer(bounds * 4), pa.py_buffer(values)]
    )
    return pa.table(
        {
            "a": [r[0] for r in rows],
            "b": [r[1] for r in rows],
            "side": pa.array([r[2] for r in rows], pa.int8()),
            "id": [r[3] for r in rows],
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
    assert out.to_pylist() == [{"id_a": "x", "id_b": "y", "jaccard": 0.75}]
    assert verify_pairs(pair_block([("x", "y")], texts), threshold=0.76).num_rows == 0


def edges(*pairs: tuple[str, str, float]) -> pa.Table:
    """Verified edges of whole groups, as choose_survivors gets them."""
    return pa.table(
        {"id_a": [a for a, _, _ in pairs], "id_b": [b for _, b, _ in pairs], "jaccard": [j for _, _, j in pairs]}
    )


def removed(table: pa.Table) -> dict[str, tuple]:
    return {
        r["id"]: (r["duplicate_of"], r["jaccard"], r["has_kept_neighbour"])
        for r in table.to_pylist()
        if r["duplicate_of"]
    }


def test_a_chain_keeps_both_ends_and_removes_the_middle():
    chain = edges(("A", "B", 0.85), ("B", "C", 0.9))  # A ~ B ~ C, A !~ C
    assert removed(choose_survivors(chain, "greedy")) == {"B": ("A", 0.85, True)}
    old_rule = removed(choose_survivors(chain, "component"))
    assert old_rule.keys() == {"B", "C"} and old_rule["B"] == ("A", 0.85, True)
    survivor, jaccard, has_kept = old_rule["C"]  # the old rule removes C, which resembles no kept document
    assert survivor == "A" and np.isnan(jaccard) and not has_kept


def test_a_star_keeps_its_centre_only_when_the_centre_comes_first():
    first = edges(("a", "b", 0.9), ("a", "c", 0.8), ("a", "d", 0.95))
    assert removed(choose_survivors(first, "greedy")) == {
        "b": ("a", 0.9, True),
        "c": ("a", 0.8, True),
        "d": ("a", 0.95, True),
    }
    last = edges(("z", "b", 0.9), ("z", "c", 0.8), ("z", "d", 0.95))
    assert removed(choose_survivors(last, "greedy")) == {"z": ("d", 0.95, True)}, "z goes to its most similar"


def test_greedy_survivors_are_independent_and_dominating():
    """Random graphs: no verified edge joins two kept documents, and each removed one names a kept
    neighbour whose Jaccard is the edge's."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        docs = [f"d{i:02d}" for i in range(30)]
        pairs = {tuple(sorted(rng.choice(docs, 2, replace=False))) for _ in range(40)}
        graph = edges(*((a, b, float(rng.uniform(0.8, 1))) for a, b in pairs))
        chosen = choose_survivors(graph, "greedy")
        assert set(chosen["id"].to_pylist()) == {d for p in pairs for d in p}
        gone = removed(chosen)
        kept = {d for p in pairs for d in p} - set(gone)
        assert not [p for p in pairs if set(p) <= kept]
        weight = {frozenset((a, b)): j for a, b, j in zip(*(graph[c].to_pylist() for c in ("id_a", "id_b", "jaccard")))}
        for doc, (survivor, jaccard, has_kept) in gone.items():
            assert survivor in kept and has_kept and jaccard == weight[frozenset((doc, survivor))]


def test_groups_are_reported_by_their_smallest_id():
    chosen = choose_survivors(edges(("c", "d", 0.9), ("b", "c", 0.9), ("x", "y", 0.8)), "greedy")
    assert dict(zip(chosen["id"].to_pylist(), chosen["group"].to_pylist())) == {
        "b": "b",
        "c": "b",
        "d": "b",
        "x": "x",
        "y": "x",
    }


def test_components_of_the_candidate_pairs_are_found_on_arrays():
    nodes, roots = component_roots(np.array([5, 9, 7, 100]), np.array([9, 20, 3, 200]))
    assert dict(zip(nodes.tolist(), roots.tolist())) == {3: 3, 5: 5, 7: 3, 9: 5, 20: 5, 100: 100, 200: 100}
    rng = np.random.default_rng(1)  # a long chain in shuffled order: pointer jumping must still join it all
    chain = rng.permutation(500)
    nodes, roots = component_roots(chain[:-1], chain[1:])
    assert (roots == chain.min()).all() and len(nodes) == 500


def test_component_keys_name_components_and_spread_over_the_sort_ranges():
    rng = np.random.default_rng(3)
    docs = rng.integers(-(2**63), 2**63 - 1, size=(1000, 20), dtype=np.int64)  # 1,000 components of 20: stars
    pairs = np.stack([np.repeat(docs[:, 0], 19), docs[:, 1:].ravel()], axis=1)
    keys = component_keys(pairs)
    by_component = keys.reshape(1000, 19)
    assert (by_component == by_component[:, :1]).all() and len(np.unique(by_component[:, 0])) == 1000
    # the roots (each component's smallest key) put 93% of the components in the lowest of 8 even ranges
    ranges = np.searchsorted(even_split(8), by_component[:, 0])
    assert np.bincount(ranges, minlength=8).max() < 1000 / 8 * 1.4


def test_near_duplicates_point_at_their_survivor_and_exact_copies_follow_on():
    batch = pa.Table.from_pandas(
        table(
            {"id": "a", "text": "t"},
            {"id": "b", "text": "t"},
            {
                "id": "b-copy",
                "text": "t",
                "reason": "exact duplicate",
                "step": "exact_dedup",
                "duplicate_of": "b",
                "jaccard": 1.0,
            },
            {"id": "c", "text": "t", "reason": "too short", "step": "filters"},
        ),
        preserve_index=False,
    )
    gone = pa.table(
        {"id": ["b", "c"], "duplicate_of": ["a", "a"], "jaccard": [0.9, 0.8], "has_kept_neighbour": [True, True]}
    )
    out = mark_near_duplicates(batch, gone).to_pandas().set_index("id")
    assert out[["reason", "step", "duplicate_of"]].to_dict("index") == {
        "a": {"reason": "", "step": "", "duplicate_of": ""},
        "b": {"reason": "near duplicate", "step": "fuzzy_dedup", "duplicate_of": "a"},
        "b-copy": {"reason": "exact duplicate", "step": "exact_dedup", "duplicate_of": "a"},
        "c": {"reason": "too short", "step": "filters", "duplicate_of": ""},
    }
    assert out.loc["b", "jaccard"] == 0.9 and out.loc["b-copy", "jaccard"] == 0.9 and np.isnan(out.loc["a", "jaccard"])
    assert mark_near_duplicates(batch, gone.slice(0, 0)) is batch


@pytest.mark.parametrize("suffix, codec", [(".jsonl.zst", "zstd"), (".jsonl.gz", "gzip"), (".txt.zst", "zstd")])
def test_compressed_files_are_read_and_corrupt_ones_rejected(tmp_path, suffix, codec):
    from pipeline.curate.read import ReadOptions, file_records

    body = b'{"id": "a", "text": "one two three four five"}\n' if ".jsonl" in suffix else b"one two three four five"
    path = tmp_path / f"doc{suffix}"
    with pa.CompressedOutputStream(str(path), codec) as out:
        out.write(body)
    (rec,) = file_records(str(path), ReadOptions())
    assert rec["text"] == "one two three four five" and rec["reason"] == ""
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(path.read_bytes()[:8] + b"garbage")
    (bad,) = file_records(str(broken), ReadOptions())
    assert bad["reason"].startswith("unreadable file") and bad["id"] == str(broken)
    assert bad["step"] == "read"


def test_reads_share_a_task_with_the_steps_after_them_only_when_read_tasks_outnumber_the_cpus():
    from pipeline.curate.read import read_cpus

    assert read_cpus(8, 2) == 1.0  # bench/curate.py's corpus: read, normalize and filter files in one task
    assert read_cpus(4, 2) == 1.0
    assert read_cpus(3, 2) == 0.5  # a large file's blocks are processed on every core
    assert read_cpus(1, 16) == 0.5


def test_files_are_read_in_groups_of_about_32_mb_and_four_groups_per_cpu_at_least():
    from pipeline.curate.read import file_groups

    names = [f"f{i:02}" for i in range(64)]
    groups = file_groups(names, [int(3.7e6)] * 64, 2)  # bench/curate.py's corpus on 2 CPUs
    assert [len(g) for g in groups] == [8] * 8 and sum(groups, []) == names  # every file once, in order
    big = file_groups(names, [int(3.7e6)] * 64, 1)  # a run stops short of 32 MiB
    assert [len(g) for g in big] == [9] * 7 + [1]
    assert file_groups(["a", "b", "c"], [10, 10, 10], 2) == [["a"], ["b"], ["c"]]  # few files: one task each
    assert file_groups(["a", "huge", "b", "c"], [5, 10**9, 5, 5], 1) == [["a"], ["huge"], ["b", "c"]]
    assert file_groups([], [], 2) == []


def test_curate_turns_ray_datas_reservations_off_for_itself_only():
    import ray

    from pipeline.curate.stage import every_cpu_from_the_start

    context = ray.data.DataContext.get_current()
    assert context.op_resource_reservation_enabled
    with every_cpu_from_the_start():
        assert not context.op_resource_reservation_enabled
    with pytest.raises(ValueError), every_cpu_from_the_start():
        raise ValueError("a failed curate")
    assert context.op_resource_reservation_enabled


def test_a_blocks_tally_counts_every_row_by_reason_and_bins_only_the_kept_ones():
    from pipeline.curate.stage import HISTOGRAM_BINS, _tally

    batch = arrow(
        table(
            {"id": "a", "text": "one two three"},
            {"id": "b", "text": " ".join(["w"] * 250)},
            {"id": "c", "text": "one two three", "augmented_from": "a"},
            {"id": "d", "text": "", "reason": "empty", "step": "read"},
            {"id": "e", "text": "x y", "reason": "too short", "step": "filters"},
            {"id": "f", "text": "x y z", "reason": "too short", "step": "filters"},
        )
    )
    batch = batch.append_column("perplexity", pa.array([12.0, None, 3000.0, None, 5.0, 5.0]))
    rows = {(r["step"], r["reason"]): r for r in _tally(batch).to_pylist()}
    assert {k: r["count_all"] for k, r in rows.items()} == {
        ("", ""): 3,
        ("read", "empty"): 1,
        ("filters", "too short"): 2,
    }
    kept = rows[("", "")]
    assert kept["augmented"] == 1 and len(kept["words"]) == len(HISTOGRAM_BINS) - 1
    filled = {int(i): n for i, n in enumerate(kept["words"]) if n}
    assert filled == {
        int(np.searchsorted(HISTOGRAM_BINS, 3, "right")) - 1: 2,
        int(np.searchsorted(HISTOGRAM_BINS, 250, "right")) - 1: 1,
    }
    assert sum(kept["perplexity"]) == 2  # the kept rows with a score; rejected rows are in no histogram
    assert rows[("filters", "too short")]["words"] == [] and rows[("filters", "too short")]["augmented"] == 0


def test_curate_collections_walk_only_what_curate_made():
    import gc
    import weakref

    from pipeline.curate.stage import collections_see_only_new_objects

    class Node:
        pass

    def cycle() -> weakref.ref:
        node = Node()
        node.me = node  # freed only by a collection
        return weakref.ref(node)

    gc.disable()  # no automatic collection between the steps below
    try:
        older = cycle()
        with collections_see_only_new_objects():
            assert gc.get_freeze_count() > 0
            newer = cycle()
            gc.collect()
            assert newer() is None and older() is not None  # the older object is frozen, not walked
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert older() is None
    finally:
        gc.enable()

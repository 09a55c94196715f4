"""Curation's bulk text work runs in Arrow (curate/arrow_text.py, the Arrow JSON reader): each rule must give
what the Python rule it replaces gives, for every code point, for every way a JSON-lines file can be broken,
and on the demo and benchmark corpora."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import PLANTED
from pipeline.config import FiltersConfig
from pipeline.curate import arrow_text
from pipeline.curate.filters import apply_filters, build_filters
from pipeline.curate.normalize import normalize_batch, normalize_text
from pipeline.curate.read import ReadOptions, file_blocks, file_records, jsonl_table
from pipeline.curate.records import table
from pipeline.sample_data import build_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from curate import build_corpus as build_bench_corpus  # noqa: E402
from curate import python_rules  # noqa: E402

EVERY_CODE_POINT = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]


def test_every_code_point_is_space_split_stripped_and_normalized_as_python_does():
    # each code point alone, doubled, beside spaces, newlines and carriage returns
    texts = [f"{c}a{c}{c} \r\n {c}\n\n\n\nb\r{c} " for c in EVERY_CODE_POINT]
    column = pa.array(texts, pa.large_string())
    assert arrow_text.word_counts(column).to_pylist() == [len(t.split()) for t in texts]
    assert arrow_text.normalize(column).to_pylist() == [normalize_text(t) for t in texts]
    alone = pa.array(EVERY_CODE_POINT, pa.large_string())
    assert arrow_text.is_blank(alone).to_pylist() == [not c.strip() for c in EVERY_CODE_POINT]


def test_texts_of_inert_code_points_are_their_own_nfkc_and_are_left_alone():
    """nfkc normalizes only the rows holding a code point outside _nfkc_inert: each inert one is assigned, its
    own NFKC, of combining class 0 and the second of no canonical pair anywhere in Unicode, so that a text of
    them passes NFKC's quick check; and a row mixing them with one that composes is normalized."""
    import random
    import unicodedata

    outside = pa.compute.match_substring_regex(pa.array(EVERY_CODE_POINT), f"[^{arrow_text._nfkc_inert()}]")
    inert = [c for c, out in zip(EVERY_CODE_POINT, outside.to_pylist()) if not out]
    seconds = set(arrow_text.HANGUL_JAMO_THAT_COMPOSE)
    for c in EVERY_CODE_POINT:
        parts = unicodedata.decomposition(c).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(int(parts[1], 16))
    assert len(inert) > 50_000 and not seconds & {ord(c) for c in inert}
    assert all(unicodedata.normalize("NFKC", c) == c and not unicodedata.combining(c) for c in inert)
    assert all(unicodedata.category(c) != "Cn" for c in inert)
    pick = random.Random(19)
    texts = ["".join(pick.choices(inert, k=12)) for _ in range(3000)]
    assert all(unicodedata.is_normalized("NFKC", t) for t in texts)
    mixed = [
        *texts[:20],
        "caf\u00e9 \u2014 \u201cok\u201d",
        "e\u0301",
        "\u1100\u1161",
        "\u0b47\u0b3e x",
        "\ufb01 \u00bd",
    ]
    assert arrow_text.nfkc(pa.array(mixed, pa.large_string())).to_pylist() == [
        unicodedata.normalize("NFKC", t) for t in mixed
    ]


def test_the_space_class_is_what_python_calls_whitespace():
    assert [c for c in range(sys.maxunicode + 1) if chr(c).isspace()] == arrow_text.SPACE_CODES


def test_words_are_counted_in_any_layout_of_a_column():
    """Slices, both string types, nulls, empty rows, chunks, and a row with a non-ASCII space among ASCII ones."""
    texts = ["", None, " a  b ", "", "x\u3000y z", "é\tb\x1c", "\x00 \x08\x0e", "last"]
    python = [len((t or "").split()) for t in texts]
    for kind in (pa.string(), pa.large_string()):
        column = pa.array(["pad words"] + texts, kind)
        assert arrow_text.word_counts(column.slice(1)).to_pylist() == python
        assert arrow_text.word_counts(pa.chunked_array([column.slice(1, 3), column.slice(4)])).to_pylist() == python
    assert arrow_text.word_counts(pa.array([], pa.large_string())).to_pylist() == []
    validity, offsets = np.packbits([1, 0], bitorder="little"), np.array([0, 3, 6], np.int64)
    buffers = [pa.py_buffer(b) for b in (validity, offsets, b"a bc d")]
    null_with_bytes = pa.Array.from_buffers(pa.large_string(), 2, buffers)
    assert arrow_text.word_counts(null_with_bytes).to_pylist() == [2, 0]
    # over a MiB of text: counted in runs of rows (arrow_text.row_runs), a longer row a run alone
    long = ["w " * 300_000, "a\u3000b c", None, "", " x " * 200_000, "y\u2028z", "tail end"]
    column = pa.array(long, pa.large_string())
    runs = arrow_text.row_runs(column)
    assert len(runs) > 1 and pa.concat_arrays(runs).equals(column)
    assert arrow_text.word_counts(column).to_pylist() == [len((t or "").split()) for t in long]


def arrow_chain(path: Path, filters: list) -> list[tuple]:
    rows = []
    for block in file_blocks(str(path), ReadOptions()):
        block = apply_filters(normalize_batch(block), filters)
        rows += zip(*(block[c].to_pylist() for c in ("id", "text", "reason", "step")))
    return rows


@pytest.mark.parametrize("corpus", ["demo", "bench"])
def test_the_arrow_chain_keeps_and_rejects_what_the_python_rules_do(corpus, tmp_path):
    files = (
        build_corpus(tmp_path, max_bytes=2_000_000, shards=2)
        if corpus == "demo"
        else build_bench_corpus(tmp_path, 3_000_000)[0][:8]
    )
    filters = build_filters(FiltersConfig(min_words=100, max_words=2000))  # and the default repetition filters
    reasons = set()
    for path in files:
        assert jsonl_table(str(path), path.read_bytes(), ReadOptions()) is not None  # the Arrow reader read it
        python, arrow = python_rules(path, filters), arrow_chain(path, filters)
        assert arrow == python
        reasons |= {reason.split(" (")[0] for _, _, reason, _ in arrow}
    assert reasons >= {"", "too short", "repetitive"}  # kept and rejected, by the Arrow filter and a Python one


LINES = {
    "clean": [{"id": "a", "text": "One document."}, {"id": "b", "text": "Another one."}],
    "integer and missing ids": [{"id": 7, "text": "x"}, {"text": "no id"}, {"id": None, "text": "null id"}],
    "missing, null and blank text": [{"id": "a"}, {"id": "b", "text": None}, {"id": "c", "text": " \u3000\x1c\n"}],
    "non-string text": [{"id": "a", "text": 5}, {"id": "b", "text": "fine"}],
    "other fields of any type": [{"id": "a", "text": "x", "n": [1, {"k": None}]}, {"id": "b", "text": "y", "n": "s"}],
}
RAW = {
    "planted bad records": "".join(json.dumps(r) + "\n" for r in PLANTED) + '{"id": "bad-json", "text": \n',
    "blank lines": '{"id": "a", "text": "x"}\n\n   \n{"id": "b", "text": "y"}\n',
    "two records on a line": '{"id": "a", "text": "x"} {"id": "b", "text": "y"}\n',
    "byte-order mark": '\ufeff{"id": "a", "text": "x"}\n',
    "CRLF line ends": '{"id": "a", "text": "x"}\r\n{"id": "b", "text": "y"}\r\n',
    "no final newline": '{"id": "a", "text": "x"}',
    "a list, not an object": "[1, 2]\n",
    "duplicate key": '{"id": "a", "text": "x", "text": "y"}\n',
    "lone surrogate": '{"id": "a", "text": "\\ud800"}\n',
}


@pytest.mark.parametrize("case", [*LINES, *RAW, "invalid utf-8"])
def test_a_jsonl_file_gives_the_same_records_whichever_reader_reads_it(case, tmp_path):
    path = tmp_path / "part.jsonl"
    if case in LINES:
        path.write_text("".join(json.dumps(r) + "\n" for r in LINES[case]))
    elif case in RAW:
        path.write_text(RAW[case])
    else:
        path.write_bytes(b'{"id": "a", "text": "caf\xe9"}\n{"id": "b", "text": "ok"}\n')
    read = pa.concat_tables(file_blocks(str(path), ReadOptions())).drop_columns("jaccard")  # NaN != NaN
    assert read.to_pylist() == table(list(file_records(str(path), ReadOptions()))).drop_columns("jaccard").to_pylist()
    fast = {"clean", "integer and missing ids", "missing, null and blank text", "other fields of any type"}
    fast |= {"CRLF line ends", "no final newline"}
    assert (jsonl_table(str(path), path.read_bytes(), ReadOptions()) is not None) == (case in fast)

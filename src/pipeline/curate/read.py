"""Readers: one Ray Data task per group of input files (file_groups), turning every line/element/row/WARC
record into a record.

A file's records are yielded in chunks as they are read, so a large file becomes many blocks. Nothing
here raises on bad data: a malformed line, invalid UTF-8, a missing text field or a crawl's non-HTML
response becomes a record with a `reason` (and the raw input), so it ends up in `rejected/`.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from xml.etree import ElementTree

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
import ray

from pipeline.config import ImageTextConfig, TableConfig
from pipeline.curate import arrow_text
from pipeline.curate.images import IMAGE_SUFFIXES, image_file, is_sidecar, pair_from_record
from pipeline.curate.records import SCHEMA, STRING, read_reject, record, table
from pipeline.curate.table import table_records
from pipeline.curate.web import html_file, warc_records
from pipeline.curate.wiki import wiki_pages


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    id_field: str = "id"
    keep_fields: tuple[str, ...] = ()  # carried into `meta`; every other field is dropped
    rename: dict = field(default_factory=dict)  # keep_fields' names inside `meta`
    table: TableConfig = field(default_factory=TableConfig)  # CSV/TSV (and Parquet tables): rows to text
    image_text: ImageTextConfig = field(default_factory=ImageTextConfig)  # captions of images


COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}  # pyarrow's codecs: no extra dependency
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".html": "html",
    ".htm": "html",
    ".warc": "warc",  # .warc.gz too: fastwarc reads gzip members itself
    ".wet": "warc",
    ".xml": "wiki",  # MediaWiki dumps, .xml.bz2 as Wikipedia publishes them
    **dict.fromkeys(IMAGE_SUFFIXES, "image"),  # with their sidecar captions
}
CHUNK_ROWS = 500  # records per block a reader yields


def expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches and Path(pattern).is_file():
            matches = [pattern]
        for m in matches:  # absolute: the read tasks may run in another directory
            found = sorted(p for p in Path(m).rglob("*") if p.is_file()) if Path(m).is_dir() else [Path(m)]
            files += [str(f.absolute()) for f in found]
    if not files:
        raise FileNotFoundError(f"no input files match {patterns}")
    found = set(files)
    return [f for f in files if not is_sidecar(f, found)]


def file_format(path: str) -> str:
    suffixes = [s for s in Path(path).suffixes if s not in COMPRESSION]
    fmt = FORMATS.get(suffixes[-1].lower() if suffixes else "")
    if fmt is None:
        raise ValueError(
            f"{path}: unknown format; expected one of {sorted(FORMATS)} (optionally {' or '.join(COMPRESSION)})"
        )
    return fmt


def _open_stream(path: str) -> IO[bytes]:
    codec = COMPRESSION.get(Path(path).suffix)
    return pa.CompressedInputStream(path, codec) if codec else open(path, "rb")  # the caller closes it


def _open_bytes(path: str) -> bytes:
    with _open_stream(path) as stream:
        return stream.read()


def _wiki_file(path: str) -> Iterator[dict]:
    with _open_stream(path) as stream:
        yield from wiki_pages(stream, path)


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate, which JSON's \\ud800 escapes can make and no file can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_value(value, rid: str, source: str, opts: ReadOptions, raw: str) -> dict:
    if not isinstance(value, dict):
        return read_reject(rid, source, "not a JSON object", raw=raw)
    if opts.id_field in value and value[opts.id_field] is not None and is_unicode(str(value[opts.id_field])):
        rid = str(value[opts.id_field])
    if opts.image_text.records:
        return pair_from_record(value, rid, source, opts.image_text, raw)
    text = value.get(opts.text_field)
    if not isinstance(text, str):
        return read_reject(rid, source, f"missing text field {opts.text_field!r}", raw=raw)
    if not is_unicode(text):
        return read_reject(rid, source, "text is not valid Unicode (a lone surrogate \\u escape)", raw=raw)
    if not text.strip():
        return read_reject(rid, source, "empty text", raw=raw)
    meta = {opts.rename.get(k, k): value[k] for k in opts.keep_fields if k in value}
    return record(rid, text=text, source=source, meta=json.dumps(meta, default=str) if meta else "")


def _jsonl(path: str, data: bytes, opts: ReadOptions) -> Iterator[dict]:
    for n, line in enumerate(data.splitlines(), start=1):
        rid = f"{path}:{n}"
        if not line.strip():
            continue  # blank lines carry no record
        try:
            raw = line.decode("utf-8")
        except UnicodeDecodeError:
            yield read_reject(rid, path, "invalid utf-8", raw=line.decode("utf-8", "replace"))
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            yield read_reject(rid, path, f"malformed json: {e.msg}", raw=raw)
            continue
        yield _from_value(value, rid, path, opts, raw)


def _json_array(path: str, data: bytes, opts: ReadOptions) -> Iterator[dict]:
    try:
        values = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield read_reject(f"{path}:0", path, f"malformed json file: {e}", raw=data[:10_000].decode("utf-8", "replace"))
        return
    if not isinstance(values, list):
        values = [values]
    for n, value in enumerate(values):
        yield _from_value(value, f"{path}:{n}", path, opts, json.dumps(value)[:10_000])


def _parquet(path: str, data: bytes, opts: ReadOptions) -> Iterator[dict]:
    if opts.table.parquet:
        yield from table_records(path, data, "parquet", opts.table)
        return
    table = pq.read_table(io.BytesIO(data))
    for n, row in enumerate(table.to_pylist()):
        yield _from_value(row, f"{path}:{n}", path, opts, json.dumps(row, default=str)[:10_000])


def _text(path: str, data: bytes, opts: ReadOptions) -> Iterator[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield read_reject(path, path, "invalid utf-8", raw=data[:10_000].decode("utf-8", "replace"))
        return
    yield record(path, text=text, source=path) if text.strip() else read_reject(path, path, "empty text")


READERS = {
    "jsonl": _jsonl,
    "json": _json_array,
    "parquet": _parquet,
    "text": _text,
    "html": lambda path, data, opts: html_file(path, data),
    "csv": lambda path, data, opts: table_records(path, data, "csv", opts.table),
    "tsv": lambda path, data, opts: table_records(path, data, "tsv", opts.table),
}


STREAMED = {  # readers that open the path themselves: crawls and dumps record by record, never whole
    "warc": lambda path, opts: warc_records(path),
    "wiki": lambda path, opts: _wiki_file(path),
    "image": lambda path, opts: [image_file(path, opts.image_text)],
}


def file_records(path: str, opts: ReadOptions) -> Iterator[dict]:
    """The file's records; what cannot be read (a corrupt .gz, a broken WARC or XML) ends it with a reject."""
    fmt, n = file_format(path), 0
    try:
        records = STREAMED[fmt](path, opts) if fmt in STREAMED else READERS[fmt](path, _open_bytes(path), opts)
        for rec in records:
            n += 1
            yield rec
    except (OSError, pa.ArrowException, ElementTree.ParseError) as e:
        after = f" after {n} records" if n else ""
        yield read_reject(f"{path}#{n}" if n else path, path, f"unreadable file{after}: {e}")
        return
    if n == 0:
        yield read_reject(path, path, "empty file")


BOM = b"\xef\xbb\xbf"


def jsonl_table(path: str, data: bytes, opts: ReadOptions) -> pa.Table | None:
    """A JSON-lines file parsed by Arrow's reader: the records `_jsonl` makes of it, or None where they could
    differ (then `_jsonl` reads it): a line Arrow does not parse as one object with a string text (and a
    string or integer id) as Python does, a blank line (which shifts line numbers), a byte-order mark (Python
    refuses it, Arrow skips it), bytes that are not UTF-8 (Arrow passes them through), or settings Arrow
    does not do (keep_fields, image-text records)."""
    if opts.keep_fields or opts.image_text.records or BOM in data or not is_utf8(data):
        return None
    lines = len(data.splitlines())
    for id_type in (STRING, pa.int64()):
        schema = pa.schema([(opts.id_field, id_type), (opts.text_field, STRING)])
        parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            parsed = pj.read_json(io.BytesIO(data), parse_options=parse)
        except pa.ArrowInvalid:
            continue
        return _jsonl_records(path, data, parsed, opts) if parsed.num_rows == lines else None
    return None


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _jsonl_records(path: str, data: bytes, parsed: pa.Table, opts: ReadOptions) -> pa.Table:
    n = parsed.num_rows
    line_ids = pa.array([f"{path}:{i}" for i in range(1, n + 1)], STRING)
    ids = pc.coalesce(parsed[opts.id_field].cast(STRING), line_ids)
    text = parsed[opts.text_field]
    reason = pc.if_else(
        pc.is_null(text),
        pa.scalar(f"missing text field {opts.text_field!r}", STRING),
        pc.if_else(arrow_text.is_blank(text), pa.scalar("empty text", STRING), pa.scalar("", STRING)),
    )
    rejected = pc.not_equal(reason, "")
    raw = [""] * n
    if pc.any(rejected).as_py():  # a rejected record keeps its line, as _jsonl's rejects do
        lines = data.splitlines()
        for i in pc.indices_nonzero(rejected).to_pylist():
            raw[i] = lines[i].decode("utf-8")
    empty = pa.array([""] * n, STRING)
    columns = {
        "id": ids,
        "text": pc.if_else(rejected, pa.scalar("", STRING), text),
        "source": pa.array([path] * n, STRING),
        "meta": empty,
        "raw": pa.array(raw, STRING),
        "reason": reason,
        "step": pc.if_else(rejected, pa.scalar("read", STRING), pa.scalar("", STRING)),
        "duplicate_of": empty,
        "jaccard": pa.array([float("nan")] * n, pa.float64()),
        "augmented_from": empty,
        "html": empty,
    }
    return pa.table(columns, schema=SCHEMA)


def file_blocks(path: str, opts: ReadOptions) -> Iterator[pa.Table]:
    """The file's records in blocks of CHUNK_ROWS: from Arrow's JSON reader where it gives what Python's
    reading gives (jsonl_table), else from file_records."""
    if file_format(path) == "jsonl":
        try:
            parsed = jsonl_table(path, _open_bytes(path), opts)
        except (OSError, pa.ArrowException):
            parsed = None  # file_records says what is wrong with the file
        if parsed is not None:
            yield from (parsed.slice(start, CHUNK_ROWS) for start in range(0, parsed.num_rows, CHUNK_ROWS))
            return
    records = file_records(path, opts)
    while chunk := list(itertools.islice(records, CHUNK_ROWS)):
        yield table(chunk)


def read_files(batch: dict, opts: ReadOptions) -> Iterator[pa.Table]:
    for paths in batch["paths"]:
        for path in paths:
            yield from file_blocks(str(path), opts)


def read_corpus(files: list[str], opts: ReadOptions) -> ray.data.Dataset:
    """`files`: expand_inputs' list (run_curate has it already, to size the input)."""
    for f in files:
        file_format(f)  # fail fast, before any task runs, on a file we cannot read
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    groups = file_groups(files, [Path(f).stat().st_size for f in files], cluster_cpus)
    ds = ray.data.from_items([{"paths": group} for group in groups], override_num_blocks=len(groups))
    cpus = read_cpus(len(groups), cluster_cpus)
    return ds.map_batches(read_files, batch_size=1, num_cpus=cpus, fn_kwargs={"opts": opts})


def file_groups(files: list[str], sizes: list[int], cpus: float, target_bytes: int = 32 << 20) -> list[list[str]]:
    """The files, in order, cut into the groups that one read task each reads: runs of at most `target_bytes`
    (a larger file is a group alone), smaller where that would leave fewer than four groups per CPU, so that
    no core waits long on another's last group. Per file, a task and a block of its own cost Ray Data more
    than reading it: bench/curate.py's 64 files of 3.7 MB, read by eight per task, make its first curate
    9.5 s instead of 10.1 (medians of 5), and its read group 4.2 s instead of 4.55."""
    budget = max(1, min(target_bytes, sum(sizes) // max(1, int(4 * cpus))))
    groups: list[list[str]] = []
    size = 0
    for path, n in zip(files, sizes):
        if not groups or (size and size + n > budget):
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += n
    return groups


def read_cpus(tasks: int, cluster_cpus: float) -> float:
    """A read task's CPU request. With two tasks or more per CPU, a whole one: Ray Data then fuses the read
    with the steps after it (extract, normalize, filters), so a file is read and processed in one task and
    its blocks do not go through the object store in between (bench/curate.py's corpus: the group took
    8.6 s instead of 10.4). With fewer tasks, half: that keeps the read apart, so the blocks of one large
    file (a WARC's pages) are processed on every core."""
    return 1.0 if tasks >= 2 * cluster_cpus else 0.5

"""Tables: CSV/TSV files (and Parquet files when `data.table.parquet` is set) rendered to text.

`data.table.mode: row` makes each row a document, written by `data.table.template` ("{name} was born in
{year}") or, with no template, as "column: value" lines; `mode: table` makes each `rows_per_document` rows
one markdown table. The table's columns and types go to `meta` with the row number, so a model's answer can
be traced to its source row. A row the template cannot fill (a null or missing column) and a malformed CSV
line are rejects with their reasons.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import TableConfig, template_fields
from pipeline.curate.records import read_reject, record


def read_table(path: str, data: bytes, fmt: str) -> tuple[pa.Table, list[dict]]:
    """The table, and a reject for each CSV line with the wrong number of fields."""
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)), []
    bad: list[dict] = []

    def malformed(row) -> str:
        reason = f"malformed {fmt.upper()} line: {row.actual_columns} fields, the header has {row.expected_columns}"
        bad.append(read_reject(f"{path}:line{row.number}", path, reason, raw=row.text))
        return "skip"

    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(use_threads=False),  # line numbers for the malformed lines
        parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", invalid_row_handler=malformed),
    )
    return table, bad


def render_row(row: dict, template: str | None) -> tuple[str, str]:
    """(text, reason): the row through the template, or "column: value" lines; a reason when a field the
    template names is missing or null."""
    if template is None:
        return "\n".join(f"{k}: {v}" for k, v in row.items() if v is not None), ""
    missing = [name for name in template_fields(template) if row.get(name) is None]
    if missing:
        return "", f"row has no value for {', '.join(missing)} (data.table.template)"
    return template.format(**row), ""


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows])


def table_records(path: str, data: bytes, fmt: str, settings: TableConfig) -> Iterator[dict]:
    table, bad = read_table(path, data, fmt)
    yield from bad
    schema = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
    rows = table.to_pylist()
    if settings.mode == "table":
        for start in range(0, len(rows), settings.rows_per_document):
            chunk = rows[start : start + settings.rows_per_document]
            meta = {"schema": schema, "rows": [start, start + len(chunk)]}
            text = markdown_table(chunk, table.column_names)
            yield record(f"{path}:{start}-{start + len(chunk)}", text=text, source=path, meta=json.dumps(meta))
        return
    for n, row in enumerate(rows):
        text, reason = render_row(row, settings.template)
        meta = json.dumps({"schema": schema, "row": n})
        if reason:
            yield read_reject(f"{path}:{n}", path, reason, raw=json.dumps(row, default=str), meta=meta)
        else:
            yield record(f"{path}:{n}", text=text, source=path, meta=meta)

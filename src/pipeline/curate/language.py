"""Language identification: resiliparse's `detect_fast`, byte n-gram profiles of 101 languages that ship
inside the wheel (nothing is downloaded at run time) and label a page in microseconds, which a crawl of
mixed languages needs. The label goes to `meta.language`; `data.filters.languages` keeps only those."""

from __future__ import annotations

import json

import pandas as pd
from resiliparse.parse.lang import detect_fast

from pipeline.curate.records import is_kept, reject


def detect_language(text: str) -> str:
    """An ISO 639-1 code such as en or de, or "unknown" for text no profile is near (digits, symbols)."""
    return detect_fast(text)[0]


def with_language(meta: str, text: str) -> tuple[str, str]:
    """The row's language (the one a reader already found, else detected now) and its meta holding it."""
    fields = json.loads(meta) if meta else {}
    fields.setdefault("language", detect_language(text))
    return fields["language"], json.dumps(fields)


def language_batch(batch: pd.DataFrame, languages: list[str]) -> pd.DataFrame:
    """Label every kept row's language in `meta` and reject those outside `languages`."""
    labelled = [
        with_language(meta, text) if kept else ("", meta)
        for text, meta, kept in zip(batch["text"].tolist(), batch["meta"].tolist(), is_kept(batch))
    ]
    batch["meta"] = [meta for _, meta in labelled]
    wanted = "/".join(languages)
    reasons = [f"language {lang} not in {wanted}" if lang and lang not in languages else "" for lang, _ in labelled]
    return reject(batch, reasons, "language")

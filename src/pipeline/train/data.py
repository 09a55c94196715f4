"""Training data on Ray Data, one builder per stage kind, each giving a train and a held-out split:

pretrain  curated Parquet (all, or the documents `where` picks) -> documents packed into seq_len rows {input_ids}
sft       instruction jsonl -> examples packed whole, loss on responses  {input_ids, labels, position_ids}
dpo       preference jsonl -> one chosen and one rejected row per pair   {chosen_*, rejected_*}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from fnmatch import fnmatchcase
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from pipeline.config import ConfigError, StageSpec
from pipeline.heldout import is_held_out
from pipeline.loading import load_tokenizer
from pipeline.train.formats import RecordError, preference_texts, prompt_and_response

IGNORE = -100  # label of tokens the loss skips (prompts, padding)


def _tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer in `path`, loaded once per worker process for as long as its files are unchanged: task
    workers outlive a stage (runtime.workers_kept), and a model may be rebuilt at the same path."""
    return _loaded_tokenizer(path, trust_remote_code, files_stamp(path))


@lru_cache(maxsize=2)
def _loaded_tokenizer(path: str, trust_remote_code: bool, stamp: tuple) -> object:
    return load_tokenizer(path, trust_remote_code)


def files_stamp(folder: str) -> tuple:
    """(name, size, mtime) of each file in `folder` (none if it is missing, which the load then reports):
    changes when any of them is rewritten."""
    stats = ((p.name, p.stat()) for p in Path(folder).glob("*") if p.is_file())
    return tuple(sorted((name, s.st_size, s.st_mtime_ns) for name, s in stats))


def tensor_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Rows of fixed-length int64 arrays. Built here because Ray's own conversion of a zero-row batch
    (a batch whose documents were all held out) fails over to pickling with a warning."""
    return pa.table({name: ArrowTensorArray.from_numpy(array) for name, array in columns.items()})


def record_key(rec: dict) -> str:
    """What decides a record's split: its id, or its content when it has none."""
    return str(rec.get("id") or json.dumps({k: v for k, v in rec.items() if v is not None}, sort_keys=True))


def records_of(batch: pd.DataFrame) -> list[dict]:
    """A batch's records: parsed from raw JSONL lines (a `line` column: what stage_datasets reads, so
    records of different formats, or whose fields change type, can share a file), or its rows without
    their empty fields."""
    if list(batch.columns) == ["line"]:
        return [parse_line(line) for line in batch["line"]]
    return [{k: v for k, v in row.items() if v is not None and v == v} for row in batch.to_dict("records")]


def parse_line(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"not valid JSON ({e.msg}): {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object: {line[:80]!r}")
    return record


def instruction_files(stages: list[StageSpec]) -> list[tuple[str, str]]:
    """(path, kind) of the stages' instruction and preference files, for instruction_texts."""
    return [(str(stage.data), stage.kind) for stage in stages if stage.kind != "pretrain"]


def split_records(files: list[tuple[str, str]], held_out: bool) -> Iterator[tuple[dict, str]]:
    """(record, kind) of instruction (sft) and preference (dpo) files, in the split training used them in:
    the held-out one or the rest."""
    for path, kind in files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip() and is_held_out(record_key(record := parse_line(line))) == held_out:
                yield record, kind


def instruction_texts(files: list[tuple[str, str]], tokenizer, limit: int, held_out: bool) -> list[str]:
    """Up to `limit` texts, prompt and answer as the model sees them (dpo: the chosen answer), of one split."""
    texts: list[str] = []
    for record, kind in split_records(files, held_out):
        prompt, answer, *_ = (preference_texts if kind == "dpo" else prompt_and_response)(record, tokenizer)
        texts.append(prompt + answer)
        if len(texts) == limit:
            return texts
    return texts


def held_out_prompt(files: list[tuple[str, str]], tokenizer) -> str | None:
    """The prompt of the first held-out instruction or preference record: a question the model was not
    trained on, in the form it was trained to answer."""
    for record, kind in split_records(files, held_out=True):
        return (preference_texts if kind == "dpo" else prompt_and_response)(record, tokenizer)[0]
    return None


def _explained(record: dict, convert):
    """convert(record), its RecordError naming the record (Ray Data shows the message, not the data)."""
    try:
        return convert(record)
    except RecordError as e:
        raise RecordError(f"record {record_key(record)[:80]}: {e}") from None


# --- pretrain -----------------------------------------------------------------------------------


def pack_documents(
    batch: pd.DataFrame,
    tokenizer_dir: str,
    seq_len: int,
    held_out: bool,
    trust_remote_code: bool,
    padding_free: bool = False,
) -> pa.Table:
    """Concatenate the split's documents (each ended by EOS) and cut the stream into seq_len rows; the tail
    shorter than a row is dropped, so no row carries padding. `padding_free`: position_ids restart after
    each EOS (and at each row start), which keeps documents from attending to each other."""
    tok = _tokenizer(tokenizer_dir, trust_remote_code)
    batch = batch[batch["id"].map(is_held_out) == held_out]
    stream: list[int] = []
    for ids in tok(batch["text"].tolist(), add_special_tokens=False)["input_ids"] if len(batch) else []:
        stream += ids + [tok.eos_token_id]
    rows = len(stream) // seq_len
    ids = np.asarray(stream[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)
    if not padding_free:
        return tensor_table({"input_ids": ids})
    return tensor_table({"input_ids": ids, "position_ids": document_positions(ids, tok.eos_token_id)})


def document_positions(ids: np.ndarray, eos: int) -> np.ndarray:
    """Each token's position inside its document, counted from the row start for a document that began
    in an earlier row: 0 at each row start and right after each EOS."""
    column = np.arange(ids.shape[1])
    starts = np.zeros(ids.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == eos
    return column - np.maximum.accumulate(np.where(starts, column, 0), axis=1)


# --- sft ----------------------------------------------------------------------------------------


def tokenize_example(prompt: str, response: str, tok, seq_len: int) -> tuple[list[int], list[int]]:
    """ids and labels of one example: the prompt's labels are IGNORE so only the response is learned.
    Too long: the response keeps at most half the row, the prompt loses its beginning."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(p) + len(r) > seq_len:
        r = r[: max(seq_len // 2, seq_len - len(p))]
        p = p[len(p) - (seq_len - len(r)) :]
    return p + r, [IGNORE] * len(p) + r


def pack_examples(
    batch: pd.DataFrame, tokenizer_dir: str, seq_len: int, held_out: bool, trust_remote_code: bool
) -> pa.Table:
    """Whole examples packed greedily into rows. position_ids restart at each example, which tells
    transformers to keep the examples of one row from attending to each other."""
    tok = _tokenizer(tokenizer_dir, trust_remote_code)
    rows: list[tuple[list, list, list]] = []
    ids, labels, positions = [], [], []
    for rec in records_of(batch):
        if is_held_out(record_key(rec)) != held_out:
            continue
        e_ids, e_labels = tokenize_example(*_explained(rec, lambda r: prompt_and_response(r, tok)), tok, seq_len)
        if len(ids) + len(e_ids) > seq_len:
            rows.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids, labels, positions = ids + e_ids, labels + e_labels, positions + list(range(len(e_ids)))
    if ids:
        rows.append((ids, labels, positions))
    pad = lambda seq, value: seq + [value] * (seq_len - len(seq))  # noqa: E731
    return tensor_table(
        {
            "input_ids": np.array([pad(r[0], tok.pad_token_id) for r in rows], dtype=np.int64).reshape(-1, seq_len),
            "labels": np.array([pad(r[1], IGNORE) for r in rows], dtype=np.int64).reshape(-1, seq_len),
            "position_ids": np.array([pad(r[2], 0) for r in rows], dtype=np.int64).reshape(-1, seq_len),
        }
    )


# --- dpo ----------------------------------------------------------------------------------------


def pair_rows(
    batch: pd.DataFrame, tokenizer_dir: str, seq_len: int, held_out: bool, trust_remote_code: bool
) -> pa.Table:
    """One padded row per side of each {prompt, chosen, rejected} pair; labels mark the response."""
    tok = _tokenizer(tokenizer_dir, trust_remote_code)
    out: dict[str, list] = {f"{side}_{k}": [] for side in ("chosen", "rejected") for k in ("ids", "labels")}
    for rec in records_of(batch):
        prompt, *answers = _explained(rec, lambda r: preference_texts(r, tok))
        if is_held_out(record_key(rec)) != held_out:
            continue
        for side, answer in zip(("chosen", "rejected"), answers):
            ids, labels = tokenize_example(prompt, answer, tok, seq_len)
            out[f"{side}_ids"].append(ids + [tok.pad_token_id] * (seq_len - len(ids)))
            out[f"{side}_labels"].append(labels + [IGNORE] * (seq_len - len(labels)))
    return tensor_table({k: np.array(v, dtype=np.int64).reshape(-1, seq_len) for k, v in out.items()})


BUILDERS = {"pretrain": pack_documents, "sft": pack_examples, "dpo": pair_rows}


def document_matches(row: dict, where: dict[str, str]) -> bool:
    """Whether a curated document's fields match every glob of `where`: `id`, `source` (its input file),
    or a key of its `meta` (the input fields data.keep_fields carried)."""
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    fields = {**meta, "id": row["id"], "source": row["source"]}
    return all(key in fields and fnmatchcase(str(fields[key]), glob) for key, glob in where.items())


def curated_documents(source: str, where: dict[str, str] | None = None) -> ray.data.Dataset:
    """The curated corpus's documents (id, text), or those `where` picks; none picked is an error that
    says which fields there are."""
    if not where:
        return ray.data.read_parquet(source).select_columns(["id", "text"])
    picked = ray.data.read_parquet(source).filter(partial(document_matches, where=where)).materialize()
    if picked.count() == 0:
        sample = ray.data.read_parquet(source).take(1)
        fields = ["id", "source", *json.loads(sample[0]["meta"] or "{}")] if sample else ["id", "source"]
        raise ConfigError(f"no curated document in {source} matches where={where}; its fields: {', '.join(fields)}")
    return picked.select_columns(["id", "text"])


def stage_datasets(
    kind: str,
    source: str,
    tokenizer_dir: str,
    trust_remote_code: bool,
    seq_len: int,
    padding_free: bool = False,
    where: dict[str, str] | None = None,
) -> dict[str, ray.data.Dataset]:
    """{"train": ..., "eval": ...} for one stage: `source` is the curated kept/ folder (pretrain, the
    documents `where` picks) or a jsonl. `padding_free` is pretraining's (SFT rows always restart
    positions per example)."""
    if not Path(source).exists():
        raise FileNotFoundError(f"{kind} data not found: {source}")
    if kind == "pretrain":
        read = curated_documents(source, where)
    else:  # raw lines, parsed in the builders: Arrow's JSON reader wants one type per field across a file
        read = ray.data.read_text(source).rename_columns({"text": "line"})
    settings = {
        "tokenizer_dir": tokenizer_dir,
        "trust_remote_code": trust_remote_code,
        "seq_len": seq_len,
        **({"padding_free": padding_free} if kind == "pretrain" else {}),
    }
    return {
        split: read.map_batches(
            BUILDERS[kind], batch_format="pandas", batch_size=64, fn_kwargs={**settings, "held_out": split == "eval"}
        )
        for split in ("train", "eval")
    }

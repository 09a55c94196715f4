"""Curation throughput and dedup quality on >= 200 MB of real text, against the single-process
datasketch MinHashLSH loop a user would write, on the same documents and parameters.

    python bench/curate.py [--mb 200] [--out bench/results/curate-cpu2.json]

Corpus: this machine's text (Debian copyright files and changelogs, man pages, the Python
standard library) cut into ~1.5 KB documents, plus edited copies of 10% of them (1 word in 200,
1 in 100, and 1 in 10 replaced) so there are near-duplicates on both sides of the threshold.
Ground truth: every pair with exact 5-gram shingle Jaccard >= threshold (prefix-filtered join).
precision = removed documents that truly have such a twin / removed documents;
recall = true pairs of which at most one document survives / true pairs;
removed_without_kept_neighbour = removed documents that no kept document resembles (content lost).
--survivors component measures the rule before greedy survivors, for comparison.
same_as_python_rules: what curate rejected before dedup, and the text it passed on, are exactly what the
rules give when applied one record at a time in plain Python (python_rules), as curate did before its
bulk work moved into Arrow.
first_curate_in_a_fresh_ray: the same curate, each time in a new process that starts its own Ray first, as
`pipeline curate` does with no RAY_ADDRESS (--fresh-runs of them; their median, since one varies by seconds
on this VM). curate_again_in_the_same_ray: the same curate once more in the Ray of `curate`. A first run
also pays for starting Ray Data's actors and for its worker processes' first imports and memory, which a
second one finds in place; memory_first_touch_s_per_gib says what memory costs a new process on this machine.
object_store_high_water_mb: how much of the local Ray's object store (in /dev/shm) the first curate wrote.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

from pipeline.curate.dedup_fuzzy import lsh_params  # noqa: E402
from pipeline.curate.jaccard import dedup_quality, similar_pairs  # noqa: E402
from pipeline.sample_data import near_duplicate_variants, split_documents  # noqa: E402

SOURCES = [
    ("/usr/share/doc", "*/copyright"),
    ("/usr/share/doc", "*/changelog*.gz"),
    ("/usr/share/man", "**/*.gz"),
    ("/usr/lib/python3.11", "**/*.py"),
]


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def build_corpus(out: Path, target_bytes: int) -> tuple[list[Path], int]:
    docs, size = [], 0
    for root, pattern in SOURCES:
        for path in sorted(Path(root).glob(pattern)):
            try:
                parts = split_documents(read_text(path))
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            for i, text in enumerate(parts):
                docs.append({"id": f"{path}#{i}", "text": text})
                size += len(text.encode())
            if size >= target_bytes * 0.85:
                break
        if size >= target_bytes * 0.85:
            break
    docs += near_duplicate_variants(docs, rates=(0.005, 0.01, 0.1), share=0.1, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"part-{k:02d}.jsonl" for k in range(64)]  # ~3.5 MB each
    handles = [f.open("w") for f in files]
    for n, doc in enumerate(docs):
        handles[n % len(files)].write(json.dumps(doc) + "\n")
    for h in handles:
        h.close()
    return files, sum(f.stat().st_size for f in files)


def python_rules(path: Path, filters: list) -> list[tuple[str, str, str, str]]:
    """(id, text, reason, step) of each record of a file as the rules state them in plain Python, one record
    at a time (read, normalize, filters): what curate did before its bulk work moved into Arrow, and what
    the Arrow path must still give."""
    from pipeline.curate.filters import first_reason
    from pipeline.curate.normalize import normalize_text
    from pipeline.curate.read import ReadOptions, file_records

    out = []
    for rec in file_records(str(path), ReadOptions()):
        if not rec["reason"]:
            text = normalize_text(rec["text"])
            reason, step = ("empty after normalization", "normalize") if not text else ("", "")
            if not reason and (reason := first_reason(text, filters)):
                step = "filters"
            rec = {**rec, "text": text, "reason": reason, "step": step}
        out.append((rec["id"], rec["text"], rec["reason"], rec["step"]))
    return out


def same_as_python_rules(files: list[Path], filters: list, kept: pd.DataFrame, rejected: pd.DataFrame) -> bool:
    """Whether curate rejected before dedup exactly what python_rules rejects (same ids, same reasons) and
    passed on to dedup exactly the rest with the same text."""
    python = [row for path in files for row in python_rules(path, filters)]
    early = rejected[rejected["step"].isin(["read", "extract", "normalize", "filters"])]
    deduped = pd.concat([kept, rejected[rejected["step"].isin(["exact_dedup", "fuzzy_dedup"])]])
    return set(zip(early["id"], early["reason"])) == {(i, r) for i, _, r, _ in python if r} and set(
        zip(deduped["id"], deduped["text"])
    ) == {(i, t) for i, t, r, _ in python if not r}


def baseline(ids: list[str], texts: list[str], threshold: float, num_perm: int, ngram: int) -> tuple[set, float]:
    """The loop users write: one MinHash per document, query the index, insert if new."""
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh, removed = MinHashLSH(threshold=threshold, num_perm=num_perm), set()
    for doc_id, text in zip(ids, texts):
        words = text.split()
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([" ".join(words[i : i + ngram]).encode() for i in range(max(len(words) - ngram + 1, 1))])
        if lsh.query(m):
            removed.add(doc_id)
        else:
            lsh.insert(doc_id, m)
    return removed, time.perf_counter() - start


def memory_touch_seconds() -> dict:
    """Seconds a new process takes to first touch 1 GiB: after the machine's free memory sat idle, and
    right after another process freed as much. On this VM the two differ twentyfold or more (the guest hands
    memory that stays free for about 2 s back to its host, and taking it back is slow), which is part of
    what a first curate in a fresh Ray pays over a second one."""
    code = (
        "import numpy, time; s = time.perf_counter(); numpy.ones(1 << 27, numpy.int64); print(time.perf_counter() - s)"
    )

    def touch() -> float:
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    time.sleep(5)
    idle = touch()
    return {"after_idle": round(idle, 2), "after_a_free": round(touch(), 2)}


def shared_memory_used() -> int:
    """Bytes in use in /dev/shm, where the local Ray's object store keeps the pages it has written: the store
    never gives them back, so what a run adds is its high-water mark (and memory it touched for the first
    time, see memory_touch_seconds)."""
    return shutil.disk_usage("/dev/shm").used


def bench_overrides(work: Path, survivors: str) -> list[str]:
    return [
        f"runs_dir={work / 'runs'}",
        "name=bench",
        f"data.input=[{work / 'corpus'}/*.jsonl]",
        # quality filters off: every document reaches dedup, which is what is compared
        "data.filters.min_words=0",
        "data.filters.max_duplicate_line_chars=0",
        "data.filters.max_top_ngram_share=0",
        "data.filters.max_symbol_words=0",
        "data.filters.min_alpha_words=0",
        f"data.dedup.survivors={survivors}",
    ]


def fresh_curate(work: Path, survivors: str) -> None:
    """One curate in a Ray this process starts, as `pipeline curate` runs with no RAY_ADDRESS; prints its
    figures as JSON."""
    from pipeline.config import load_config
    from pipeline.curate.stage import run_curate
    from pipeline.runtime import init_ray

    init_ray()
    cfg = load_config(None, [*bench_overrides(work, survivors), "name=fresh"])
    start = time.perf_counter()
    stats = run_curate(cfg)
    print(json.dumps({"seconds": time.perf_counter() - start, "by_step": stats["seconds"], **stats["by_reason"]}))


def fresh_curates(work: Path, survivors: str, n: int) -> list[dict]:
    """fresh_curate in n processes, one after the other: a first curate's time varies by seconds on this VM."""
    me = [sys.executable, __file__, "--workdir", str(work), "--survivors", survivors, "--fresh-curate"]
    runs = [subprocess.run(me, capture_output=True, text=True, check=True).stdout for _ in range(n)]
    return [json.loads(run.strip().splitlines()[-1]) for run in runs]


def first_curate_figures(runs: list[dict], in_bytes: int, by_reason: dict) -> dict:
    seconds = sorted(run["seconds"] for run in runs)
    median = float(np.median(seconds)) if seconds else float("nan")
    return {
        "runs": len(runs),
        "seconds": [round(x, 2) for x in seconds],
        "median_seconds": round(median, 2),
        "median_mb_per_s": round(in_bytes / 1e6 / median, 2),
        "same_result": all({k: run.get(k) for k in by_reason} == by_reason for run in runs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="corpus size in MB (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="where the corpus and outputs go (default: a temp dir)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--survivors", default="greedy", choices=["greedy", "component"], help="data.dedup.survivors")
    p.add_argument(
        "--fresh-runs", type=int, default=5, help="first curates, each in a new process and Ray (default: %(default)s)"
    )
    p.add_argument("--fresh-curate", action="store_true", help=argparse.SUPPRESS)  # one of them, on --workdir
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-curate-"))
    if args.fresh_curate:
        return fresh_curate(work, args.survivors)
    files, in_bytes = build_corpus(work / "corpus", int(args.mb * 1e6))
    os.sync()  # the corpus on disk, as a user's is: the kernel does not write it back while curate runs

    from pipeline.config import load_config
    from pipeline.curate.filters import build_filters
    from pipeline.curate.stage import run_curate
    from pipeline.runtime import init_ray

    runs = fresh_curates(work, args.survivors, args.fresh_runs)
    init_ray()
    cfg = load_config(None, bench_overrides(work, args.survivors))
    d = cfg.data.dedup
    shm_before = shared_memory_used()
    start = time.perf_counter()
    stats = run_curate(cfg)
    total_s = time.perf_counter() - start
    object_store_mb = round((shared_memory_used() - shm_before) / 1e6, 1)

    # the documents that reached fuzzy dedup: everything kept, plus what it removed
    out = cfg.stage_dir("curate")
    kept = pq.read_table(out / "kept", columns=["id", "text"]).to_pandas()
    rejected = pq.read_table(out / "rejected", columns=["id", "text", "reason", "step"]).to_pandas()
    start = time.perf_counter()
    again = run_curate(cfg)  # the same Ray: its worker processes and Ray Data's actors have started
    again_s = time.perf_counter() - start
    t = time.perf_counter()
    identical = same_as_python_rules(files, build_filters(cfg.data.filters), kept, rejected)
    python_s = time.perf_counter() - t
    near = rejected[rejected["reason"] == "near duplicate"]
    fuzzy_in = pd.concat([kept, near[["id", "text"]]]).sort_values("id")
    ids, texts = fuzzy_in["id"].tolist(), fuzzy_in["text"].tolist()
    fuzzy_mb = sum(len(t.encode()) for t in texts) / 1e6
    ours_s = stats["seconds"]["fuzzy_dedup"]

    base_removed, base_s = baseline(ids, texts, d.threshold, d.num_perm, d.ngram)
    t = time.perf_counter()
    truth = similar_pairs(ids, texts, d.ngram, d.threshold)
    truth_s = time.perf_counter() - t
    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "corpus_mb": round(in_bytes / 1e6, 1),
        "docs_in": stats["docs_in"],
        "params": {
            "threshold": d.threshold,
            "num_perm": d.num_perm,
            "ngram": d.ngram,
            "recall_weight": d.recall_weight,
            "survivors": d.survivors,
            "bands_x_rows": list(lsh_params(d.threshold, d.num_perm, d.recall_weight)),
        },
        "curate": {
            "seconds": round(total_s, 1),
            "docs_per_s": round(stats["docs_in"] / total_s, 1),
            "mb_per_s": round(in_bytes / 1e6 / total_s, 2),
            "kept": stats["kept"],
            "by_reason": stats["by_reason"],
            "seconds_by_step": stats["seconds"],
            "object_store_high_water_mb": object_store_mb,
            "same_as_python_rules": identical,
            "python_rules_seconds_one_process": round(python_s, 1),
        },
        "first_curate_in_a_fresh_ray": first_curate_figures(runs, in_bytes, stats["by_reason"]),
        "curate_again_in_the_same_ray": {
            "seconds": round(again_s, 1),
            "mb_per_s": round(in_bytes / 1e6 / again_s, 2),
            "seconds_by_step": again["seconds"],
            "same_result": again["by_reason"] == stats["by_reason"],
        },
        "memory_first_touch_s_per_gib": memory_touch_seconds(),
        "dedup_input": {"docs": len(ids), "mb": round(fuzzy_mb, 1)},
        "ours_fuzzy_dedup": {
            "seconds": round(ours_s, 1),
            "docs_per_s": round(len(ids) / ours_s, 1),
            "mb_per_s": round(fuzzy_mb / ours_s, 2),
            **dedup_quality(truth, set(near["id"])),
            **{k: v for k, v in stats["fuzzy_dedup"].items() if k.startswith(("component", "candidate"))},
        },
        "datasketch_loop": {
            "seconds": round(base_s, 1),
            "docs_per_s": round(len(ids) / base_s, 1),
            "mb_per_s": round(fuzzy_mb / base_s, 2),
            **dedup_quality(truth, base_removed),
        },
        "speedup_mb_per_s": round(base_s / ours_s, 2),
        "ground_truth_seconds": round(truth_s, 1),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()

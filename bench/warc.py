"""WARC extraction speed: curate's read + extract (fastwarc, resiliparse, on local Ray) against datatrove's
WarcReader + Trafilatura extractor (LocalPipelineExecutor, installed in its own venv by this bench) on the
same crawl files, with the same number of worker processes.

    python bench/warc.py [--mb 100] [--files 4] [--workers 2] [--out bench/results/warc-cpu2.json]

Crawl: this machine's HTML pages (Debian's /usr/share/doc, then any rustup documentation) up to --mb MB of
HTML, written by warcio as --files gzip WARCs of request and response records, as a crawler writes them.
pages_per_s counts response records per second of wall time; mb_per_s is MB of HTML (uncompressed) per
second; both sides start their workers inside the timing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

from pipeline.sample_data import write_warc  # noqa: E402

ROOTS = ["/usr/share/doc", str(Path.home() / ".rustup")]
DATATROVE_VENV = Path(tempfile.gettempdir()) / "bench-datatrove-venv"
DATATROVE_PACKAGES = [
    "datatrove==0.10.1",
    "trafilatura==2.3.1",
    "warcio==1.8.1",
    "faust-cchardet",
    "python-magic",
    "lxml_html_clean",
]
DATATROVE_RUN = """
import json, os, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.readers import WarcReader


def count(data, rank, world_size):
    docs = words = 0
    for doc in data:
        docs += 1
        words += len(doc.text.split())
    with open(os.path.join(os.environ["BENCH_OUT"], f"count-{rank}.json"), "w") as fh:
        json.dump({"docs": docs, "words": words}, fh)
    yield from ()


if __name__ == "__main__":
    folder, workers, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[WarcReader(folder, glob_pattern="*.warc.gz"), Trafilatura(timeout=10.0), count],
        tasks=files, workers=workers, logging_dir=os.path.join(os.environ["BENCH_OUT"], "logs"),
    ).run()
    print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def html_files(max_mb: float) -> list[Path]:
    found, size = [], 0
    for root in ROOTS:
        for path in sorted(Path(root).rglob("*.html")) if Path(root).is_dir() else []:
            if path.is_file() and not path.is_symlink():
                found.append(path)
                size += path.stat().st_size
                if size >= max_mb * 1e6:
                    return found
    return found


def build_crawl(folder: Path, pages: list[Path], files: int) -> None:
    responses = [
        (f"http://docs.example/{i}/{p.name}", "200 OK", "text/html; charset=utf-8", p.read_bytes())
        for i, p in enumerate(pages)
    ]
    for k in range(files):
        write_warc(folder / f"crawl-{k}.warc.gz", responses[k::files])


def ours(folder: Path, workers: int) -> dict:
    import ray

    from pipeline.curate.read import ReadOptions, expand_inputs, read_corpus
    from pipeline.curate.web import extract_batch

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    ds = read_corpus(expand_inputs([str(folder)]), ReadOptions()).map_batches(extract_batch, batch_format="pandas")
    words = ds.map_batches(_words_of_pages, batch_format="pandas").to_pandas()["words"]
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"seconds": seconds, "docs": len(words), "words": int(words.sum())}


def _words_of_pages(batch):
    import pandas as pd

    return pd.DataFrame({"words": [len(t.split()) for t in batch.loc[batch["reason"] == "", "text"]]}, dtype="int64")


def datatrove(folder: Path, workers: int, files: int) -> dict:
    python = DATATROVE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DATATROVE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *DATATROVE_PACKAGES], check=True)
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "run_datatrove.py"
        script.write_text(DATATROVE_RUN)
        done = subprocess.run(
            [str(python), str(script), str(folder), str(workers), str(files)],
            capture_output=True,
            text=True,
            env={**os.environ, "BENCH_OUT": out},
        )
        if done.returncode:
            raise RuntimeError(f"datatrove failed:\n{done.stderr[-3000:]}")
        counts = [json.loads(p.read_text()) for p in Path(out).glob("count-*.json")]
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "docs": sum(c["docs"] for c in counts), "words": sum(c["words"] for c in counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out")
    args = parser.parse_args()
    pages = html_files(args.mb)
    html_mb = sum(p.stat().st_size for p in pages) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crawl"
        build_crawl(folder, pages, args.files)
        crawl_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        results = {"ours (fastwarc + resiliparse, Ray Data)": ours(folder, args.workers)}
        results["datatrove (WarcReader + Trafilatura)"] = datatrove(folder, args.workers, args.files)
    for r in results.values():
        r.update(
            pages_per_s=round(len(pages) / r["seconds"], 1),
            mb_per_s=round(html_mb / r["seconds"], 2),
            seconds=round(r["seconds"], 2),
        )
    emit(
        {
            "pages": len(pages),
            "html_mb": round(html_mb, 1),
            "warc_gz_mb": round(crawl_mb, 1),
            "files": args.files,
            "workers": args.workers,
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()

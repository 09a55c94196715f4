"""Soak: does anything grow over a long run? Prints JSON.

  python bench/soak.py [--requests 20000] [--steps 2000] [--out runs/bench-soak.json]

Builds the tiny run from the shipped sample text (curate, train, quantize: a few minutes), then:
- training: `--steps` steps on 2 Ray Train workers; the fullest worker's RSS (logged every 50 steps)
  after warm-up (the first tenth of the steps) against the end of the run, and its peak (which a
  checkpoint's write raises once);
- serving: `--requests` requests (loopback only, 8 concurrent clients, 8 tokens each) against one model
  replica; the replica's RSS after warm-up (the first tenth of the requests) against the end, and
  latency p50/p99 in the first and the last quarter.
"ok" is true when both grow by at most 10% after warm-up and no request failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the serve/ app, when run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402
from load import percentiles  # noqa: E402

GROWTH_LIMIT = 0.10


def tiny_run(root: Path, steps: int):
    from pipeline.config import load_config
    from pipeline.curate.stage import run_curate
    from pipeline.export.stage import run_quantize
    from pipeline.runtime import init_ray
    from pipeline.sample_data import build_corpus
    from pipeline.train.stage import run_train

    build_corpus(root / "corpus", max_bytes=400_000, shards=2)
    overrides = [
        f"runs_dir={root / 'runs'}",
        f"data.input=[{root / 'corpus'}/*.jsonl]",
        f"train.max_steps={steps}",
        "train.log_every=50",
        f"train.checkpoint_every={max(steps // 4, 1)}",
        f"train.eval_every={steps}",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    init_ray(num_cpus=2)
    run_curate(cfg)
    started = time.perf_counter()
    run_train(cfg)
    train_s = time.perf_counter() - started
    run_quantize(cfg)
    return cfg, train_s


def growth(series: list[tuple[float, float]], warm_up: float) -> dict:
    """`series`: (progress, value); the value after warm-up against the value at the end."""
    after = [v for p, v in series if p >= warm_up]
    start, end = after[0], series[-1][1]
    return {"after_warm_up": round(start, 4), "at_end": round(end, 4), "growth": round(end / start - 1, 4)}


def train_soak(cfg, steps: int, seconds: float) -> dict:
    state = json.loads((cfg.stage_dir("train") / "pretrain" / "final" / "state.json").read_text())
    series = {
        name: growth([(h["step"], h[name]) for h in state["history"] if name in h], steps / 10)
        for name in ("rss_gib", "peak_rss_gib")
    }
    return {"steps": state["step"], "seconds": round(seconds, 1), **series}


def replica_pid(app: str) -> int:
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith(f"ray::ServeReplica:{app}:Generator"):
            return p.pid
    raise RuntimeError(f"no Generator replica process of app {app!r}")


def serve_soak(cfg, n_requests: int, concurrency: int = 8) -> dict:
    from ray import serve

    from pipeline.serving.deploy import serve_args, wait_healthy
    from pipeline.train.memory import status_bytes
    from serve.app import build_app

    args = {**serve_args(cfg).model_dump(), "min_replicas": 1, "max_replicas": 1, "num_cpus": 1}
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    serve.run(build_app(args), name="soak", route_prefix="/soak")
    url = f"http://127.0.0.1:{cfg.serve.port}/soak"
    wait_healthy(url)
    pid = replica_pid("soak")
    body = {"model": cfg.name, "prompt": "Permission is hereby granted,", "max_tokens": 8, "temperature": 0}
    results: list[tuple[int, float]] = [None] * n_requests
    rss: list[tuple[int, float]] = []
    done = threading.Event()
    finished = [0]

    def sample():
        while not done.is_set():
            rss.append((finished[0], status_bytes("VmRSS", pid) / 2**20))
            time.sleep(0.5)

    def client(indices):
        with requests.Session() as s:
            for i in indices:
                start = time.perf_counter()
                try:
                    status = s.post(f"{url}/v1/completions", json=body, timeout=120).status_code
                except requests.RequestException as e:
                    status = type(e).__name__
                results[i] = (status, time.perf_counter() - start)
                finished[0] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, [range(c, n_requests, concurrency) for c in range(concurrency)]))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    rss.append((n_requests, status_bytes("VmRSS", pid) / 2**20))
    serve.shutdown()
    quarter = n_requests // 4
    latency = [lat for _, lat in results]
    return {
        "requests": n_requests,
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        "qps": round(n_requests / seconds, 1),
        "errors_by_status": dict(Counter(str(s) for s, _ in results if s != 200)),
        "replica_rss_mib": growth(rss, n_requests / 10),
        "latency_s_first_quarter": percentiles(latency[:quarter]),
        "latency_s_last_quarter": percentiles(latency[-quarter:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000, help="requests against one replica (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2_000, help="training steps (default: %(default)s)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, train_s = tiny_run(Path(tmp), args.steps)
        result = {"train": train_soak(cfg, args.steps, train_s), "serve": serve_soak(cfg, args.requests)}
    result["ok"] = (
        result["train"]["rss_gib"]["growth"] <= GROWTH_LIMIT
        and result["serve"]["replica_rss_mib"]["growth"] <= GROWTH_LIMIT
        and not result["serve"]["errors_by_status"]
    )
    emit(result, args.out)


if __name__ == "__main__":
    main()

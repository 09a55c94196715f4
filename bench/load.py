"""Load test for the serving endpoint: N concurrent clients for a fixed time; prints JSON.

  python bench/load.py --url http://127.0.0.1:8000 --concurrency 8 --duration 20 [--stream] [--plot load.png]
  python bench/load.py --compare-batching [--config configs/demo.yaml]   # batching on vs off, c=1 and c=8
  python bench/load.py --compare-adapters 8 [--config configs/demo.yaml]  # 1 adapter vs requests over 8

--compare-batching deploys the model of the config's last run twice on a local Ray (one replica
each, @serve.batch max 8 vs 1) and measures both at concurrency 1 and 8 in the same run.
--compare-adapters N serves that model on one replica with N LoRA adapters (rank 8 on q/k/v/o, random
weights: their values do not change the work) and measures QPS at concurrency 8 with every request
on one adapter, then spread over all N (mixed batches), and the memory one loaded adapter takes.

The requests cycle through PROMPTS, not one prompt: on a mixture-of-experts model a batch of identical
rows routes every row to the same experts, which made one adapter (identical answers) look cheaper
than eight (different answers) for a reason that real traffic does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve/ app, when run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

PROMPTS = [  # openings of licence texts like those of the demo corpus
    "Permission is hereby granted, free of charge,",
    "Redistribution and use in source and binary forms,",
    "This program is free software; you can redistribute it",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY',
    "Licensed under the Apache License, Version 2.0",
    "Copyright notice and this permission notice shall be",
    "You may not use this file except in compliance",
    "In no event shall the authors or copyright holders",
    "Neither the name of the copyright holder nor the names",
    "This library is distributed in the hope that it will be useful,",
    "The above copyright notice shall be included in all copies",
    "Subject to the terms and conditions of this License,",
    "A copy of the GNU General Public License is included",
    "Unless required by applicable law or agreed to in writing,",
    "Everyone is permitted to copy and distribute verbatim copies",
    "The licenses for most software are designed to take away",
]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))], 4)  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def one_request(session: requests.Session, url: str, body: dict, headers: dict, stream: bool) -> dict:
    start = time.perf_counter()
    ttft = None
    try:
        r = session.post(
            f"{url}/v1/completions", json={**body, "stream": stream}, headers=headers, timeout=120, stream=stream
        )
        tokens = 0
        if stream and r.ok:
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif ttft is None:
                        ttft = time.perf_counter() - start
        elif r.ok:
            tokens = r.json()["usage"]["completion_tokens"]
        status = r.status_code
    except requests.RequestException as e:
        status, tokens = type(e).__name__, 0
    return {"start": start, "latency": time.perf_counter() - start, "ttft": ttft, "status": status, "tokens": tokens}


def replica_counts(app: str | None) -> int | None:
    try:
        import ray
        from ray import serve

        if not ray.is_initialized() or app is None:
            return None
        return serve.status().applications[app].deployments["Generator"].replica_states.get("RUNNING", 0)
    except Exception:  # noqa: BLE001 - replica counts are a best-effort extra
        return None


def run_load(
    url: str,
    model: str | list[str],
    concurrency: int,
    duration: float,
    max_tokens: int = 64,
    stream: bool = False,
    api_key: str | None = None,
    app: str | None = None,
) -> dict:
    """`model`: one name, or several that the requests take in turn."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = [model] if isinstance(model, str) else model
    body = {
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    results, replicas, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + duration

    def client(i):
        with requests.Session() as s:
            while time.perf_counter() < deadline:
                i += 1
                asked = {**body, "model": models[i % len(models)], "prompt": PROMPTS[(i * 5) % len(PROMPTS)]}
                res = one_request(s, url, asked, headers, stream)
                with lock:
                    results.append(res)

    def watch():
        while time.perf_counter() < deadline:
            n = replica_counts(app)
            if n is not None:
                replicas.append((round(time.perf_counter() - t0, 1), n))
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "stream": stream,
        "requests": len(results),
        "ok": len(ok),
        "qps": round(len(ok) / elapsed, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 2),
        "latency_s": percentiles([r["latency"] for r in ok]),
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "errors_by_status": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
        "replicas_over_time": replicas,
        "_timeline": [(round(r["start"] - t0, 3), round(r["latency"], 4)) for r in ok],
    }


def plot(result: dict, path: str) -> None:
    from pipeline.plots import figure, save

    done = [start + lat for start, lat in result["_timeline"]]
    seconds = range(int(result["duration_s"]) + 1)
    fig, axes = figure(3, 1, size=(7, 7), sharex=True)
    axes = axes[:, 0]
    axes[0].plot(list(seconds), [sum(1 for d in done if s <= d < s + 1) for s in seconds])
    axes[0].set_ylabel("QPS")
    axes[1].scatter([s for s, _ in result["_timeline"]], [lat for _, lat in result["_timeline"]], s=4)
    axes[1].set_ylabel("latency (s)")
    if result["replicas_over_time"]:
        t, n = zip(*result["replicas_over_time"])
        axes[2].step(t, n, where="post")
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("seconds")
    fig.suptitle(f"concurrency {result['concurrency']}: {result['qps']} QPS")
    save(fig, path)


def compare_batching(config: str, duration: float, max_tokens: int) -> dict:
    from ray import serve

    from pipeline.config import load_config
    from pipeline.runtime import init_ray
    from pipeline.serving.deploy import serve_args, wait_healthy
    from serve.app import build_app

    cfg = load_config(config)
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    base = {
        **serve_args(cfg).model_dump(),
        "min_replicas": 1,
        "max_replicas": 1,
        "num_cpus": 1,
        "batch_wait_timeout_s": 0.03,
    }
    out = {"model": base["model_dir"], "cpus": os.cpu_count(), "max_tokens": max_tokens, "runs": {}}
    for name, batch in (("batching_off", 1), ("batching_on", 8)):
        serve.run(build_app({**base, "max_batch_size": batch}), name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:{cfg.serve.port}/{name}"
        wait_healthy(url)
        for c in (1, 8):
            res = run_load(url, cfg.name, c, duration, max_tokens)
            res.pop("_timeline")
            out["runs"][f"{name}_c{c}"] = res
            print(f"{name} c={c}: {res['qps']} QPS, p50 {res['latency_s'].get('p50')} s", file=sys.stderr)
        serve.delete(name)
    on, off = out["runs"]["batching_on_c8"]["qps"], out["runs"]["batching_off_c8"]["qps"]
    out["speedup_qps_c8"] = round(on / off, 2) if off else None
    serve.shutdown()
    return out


def random_adapter(base: Path, base_digest: str, out: Path, seed: int) -> None:
    """A LoRA adapter of the demo's shape with random weights instead of LoRA's all-zero B, so that it
    changes the answers as a trained one does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_model, write_adapter_record

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(load_model(AutoModelForCausalLM, base), lora).save_pretrained(out)
    write_adapter_record(out, base, base_digest)


def adapter_bytes(model_dir: Path, adapters: dict[str, Path]) -> int:
    """Memory one loaded adapter takes on a replica, with `adapters` loaded: its LoRA tensors as peft holds
    them, and its share of the stacks that mixed batches read (adapter_rows.py)."""
    from pipeline.serving.adapter_rows import AdapterRows
    from pipeline.serving.transformers_engine import load_with_adapters

    model, rows = load_with_adapters(str(model_dir), False, adapters), AdapterRows()
    rows.install(model)
    peft_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    return (peft_bytes + rows.stacked_bytes()) // len(adapters)


def compare_adapters(config: str, n_adapters: int, duration: float, max_tokens: int) -> dict:
    import tempfile

    from ray import serve

    from pipeline.config import load_config
    from pipeline.digest import path_digest
    from pipeline.handoff import merged_model_dir
    from pipeline.runtime import init_ray
    from pipeline.serving.deploy import serve_args, wait_healthy
    from serve.app import build_app

    cfg = load_config(config)
    folder = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    names = [f"adapter-{i}" for i in range(n_adapters)]
    base = merged_model_dir(cfg)
    base_digest = path_digest(base)
    for i, name in enumerate(names):
        random_adapter(base, base_digest, folder / name, seed=i)
    args = serve_args(cfg).model_dump()
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    one_replica = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "batch_wait_timeout_s": 0.03}
    serve.run(
        build_app({**args, **one_replica, "adapters_dir": str(folder)}), name="adapters", route_prefix="/adapters"
    )
    url = f"http://127.0.0.1:{cfg.serve.port}/adapters"
    wait_healthy(url)
    out = {"model": args["model_dir"], "cpus": os.cpu_count(), "adapters": n_adapters, "concurrency": 8, "runs": {}}
    for run, models in (("base", [cfg.name]), ("one_adapter", names[:1]), (f"over_{n_adapters}_adapters", names)):
        res = run_load(url, models, 8, duration, max_tokens)
        res.pop("_timeline")
        out["runs"][run] = res
        print(f"{run}: {res['qps']} QPS, p50 {res['latency_s'].get('p50')} s", file=sys.stderr)
    serve.shutdown()
    one, spread = out["runs"]["one_adapter"]["qps"], out["runs"][f"over_{n_adapters}_adapters"]["qps"]
    out["spread_vs_one_qps"] = round(spread / one, 3) if one else None
    out["ok"] = bool(one) and spread >= 0.75 * one  # #17's target: within 25% of the single-adapter QPS
    out["bytes_per_adapter"] = adapter_bytes(Path(args["model_dir"]), {name: folder / name for name in names})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="base URL of a running endpoint")
    p.add_argument("--model", default="demo", help="model name the endpoint serves (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=20, help="seconds of load (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: %(default)s)")
    p.add_argument("--stream", action="store_true", help="stream responses and measure time to first token")
    p.add_argument("--api-key", default=os.environ.get("PIPELINE_API_KEY"))
    p.add_argument("--ray-address", help="connect here to record the replica count over time (e.g. auto)")
    p.add_argument("--app", default="llm", help="Serve application name for replica counts")
    p.add_argument("--plot", help="write a PNG of QPS, latency and replicas over time")
    p.add_argument("--compare-batching", action="store_true")
    p.add_argument(
        "--compare-adapters", type=int, metavar="N", help="QPS over N LoRA adapters vs one (after make demo)"
    )
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", help="also write the JSON here (Ray's worker logs share stdout)")
    args = p.parse_args()
    if args.compare_batching:
        emit(compare_batching(args.config, args.duration, args.max_tokens), args.out)
        return
    if args.compare_adapters:
        emit(compare_adapters(args.config, args.compare_adapters, args.duration, args.max_tokens), args.out)
        return
    if not args.url:
        p.error("--url, --compare-batching or --compare-adapters is required")
    if args.ray_address:
        import ray

        ray.init(address=args.ray_address)
    res = run_load(
        args.url, args.model, args.concurrency, args.duration, args.max_tokens, args.stream, args.api_key, args.app
    )
    if args.plot:
        plot(res, args.plot)
    res.pop("_timeline")
    emit(res, args.out)


if __name__ == "__main__":
    main()

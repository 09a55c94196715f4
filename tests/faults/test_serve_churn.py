"""Serving churn under a bounded load (2,000 requests, 8 concurrent clients): the model deployment is
scaled 1 -> 3 -> 1 replicas and then redeployed with another model (the 16-bit merged model in place
of the 4-bit one), each by `serve.run` while the requests flow. Serve replaces replicas gracefully: a
replica being stopped finishes the requests it holds. Figures: failed requests, and latency p50/p99
per phase."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from ray import serve

from conftest import timed_generate
from pipeline.handoff import merged_model_dir
from pipeline.serving.deploy import serve_args, wait_healthy
from serve.app import build_app

pytestmark = [pytest.mark.faults, pytest.mark.integration]
APP, TOTAL, CLIENTS = "churn", 2000, 8


def replicas() -> dict:
    return dict(serve.status().applications[APP].deployments["Generator"].replica_states)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_scaling_and_redeploying_under_load_fails_no_request(tiny_run):
    base = {
        **serve_args(tiny_run).model_dump(),
        "num_cpus": 0.25,
        "max_batch_size": 8,
        "api_key_sha256": None,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
    }
    steps = [  # (after this many finished requests, what is deployed, phase name)
        (300, {"min_replicas": 3, "max_replicas": 3}, "scaled to 3"),
        (800, {"min_replicas": 1, "max_replicas": 1}, "scaled back to 1"),
        (1300, {"min_replicas": 1, "max_replicas": 1, "model_dir": str(merged_model_dir(tiny_run))}, "new model"),
    ]
    serve.start(http_options={"host": "127.0.0.1", "port": tiny_run.serve.port})
    url = f"http://127.0.0.1:{tiny_run.serve.port}/{APP}"
    done, results, lock = [0], [], threading.Lock()

    def one(i: int) -> None:
        result = timed_generate(url, i)
        with lock:
            results.append(result)
            done[0] += 1

    try:
        serve.run(build_app({**base, "min_replicas": 1, "max_replicas": 1}), name=APP, route_prefix=f"/{APP}")
        wait_healthy(url)
        changes = [(time.time(), "1 replica")]
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(one, i) for i in range(TOTAL)]
            for after, update, phase in steps:
                while done[0] < after:
                    time.sleep(0.05)
                changes.append((time.time(), phase))
                serve.run(build_app({**base, **update}), name=APP, route_prefix=f"/{APP}")  # returns once running
            for f in futures:
                f.result()
        settled = replicas()
    finally:
        serve.shutdown()

    failed = [code for _, _, code in results if code != 200]
    lines = []
    for (start, phase), (end, _) in zip(changes, [*changes[1:], (float("inf"), None)]):
        latencies = [lat for t, lat, _ in results if start <= t < end]
        if latencies:
            p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
            lines.append(f"{phase}: {len(latencies)} requests, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(f"\nFIGURE serving churn: {len(failed)} failed of {len(results)}; " + "; ".join(lines))
    assert len(results) == TOTAL and not failed, failed[:10]
    assert settled == {"RUNNING": 1}, settled

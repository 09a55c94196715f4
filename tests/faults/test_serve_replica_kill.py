"""A model replica SIGKILLed under steady concurrent load (500 requests, 8 clients) with 2 replicas:
the ingress retries the calls that were on it on the live replica, so no request fails, and Serve
starts a replacement. Figures: failed requests out of 500, the latency spike, time to recover."""

import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from ray import serve

from pipeline.serving.deploy import serve_args, wait_healthy
from serve.app import build_app

pytestmark = [pytest.mark.faults, pytest.mark.integration]
APP, TOTAL, CLIENTS = "faulty", 500, 8


def replica_pids() -> list[int]:
    """Ray titles a replica's process after it: ray::ServeReplica:<app>:<deployment>. (Ray's state API
    would say the same, but it needs the dashboard, which our local Ray runs without.)"""
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith(f"ray::ServeReplica:{APP}:Generator")
    ]


def running_replicas() -> int:
    return serve.status().applications[APP].deployments["Generator"].replica_states.get("RUNNING", 0)


def replaced(killed: int) -> bool:
    """Serve counts a killed replica as running until its health check fails (a CI run read 2 and
    then 1), so a replacement is two live replica processes, neither the killed one, both running."""
    pids = replica_pids()
    return len(pids) == 2 and killed not in pids and running_replicas() == 2


@pytest.fixture()
def two_replicas(tiny_run):
    args = {
        **serve_args(tiny_run).model_dump(),
        "min_replicas": 2,
        "max_replicas": 2,
        "num_cpus": 0.25,
        "max_batch_size": 8,
        "api_key_sha256": None,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": tiny_run.serve.port})
    try:
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        url = f"http://127.0.0.1:{tiny_run.serve.port}/{APP}"
        wait_healthy(url)
        while running_replicas() < 2:
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()  # replicas left alive would starve later Ray Train runs of CPUs


def test_killing_a_model_replica_under_load_fails_no_request(two_replicas):
    url = two_replicas

    done, results, lock = [0], [], threading.Lock()

    def one(i: int) -> None:
        start = time.time()
        r = requests.post(f"{url}/generate", json={"prompt": f"Permission {i}", "max_new_tokens": 4}, timeout=120)
        with lock:
            results.append((start, time.time() - start, r.status_code))
            done[0] += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one, i) for i in range(TOTAL)]
        while done[0] < 100:
            time.sleep(0.05)
        killed_at, killed = time.time(), replica_pids()[0]
        os.kill(killed, signal.SIGKILL)
        for f in futures:
            f.result()

    failed = [code for _, _, code in results if code != 200]
    before = [lat for start, lat, _ in results if start + lat < killed_at]
    around = [lat for start, lat, _ in results if start <= killed_at + 5 and start + lat >= killed_at]
    deadline = time.time() + 120
    while not replaced(killed) and time.time() < deadline:
        time.sleep(1)
    recovered_s = time.time() - killed_at
    print(
        f"\nFIGURE serve replica SIGKILL under load: {len(failed)} failed of {len(results)} requests; "
        f"latency p50 before {statistics.median(before) * 1000:.0f} ms, max around the kill "
        f"{max(around) * 1000:.0f} ms; 2 replicas running again {recovered_s:.0f} s after the kill"
    )
    assert len(results) == TOTAL and not failed, failed
    assert replaced(killed), "the killed replica was not replaced"
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert "llm_replica_retries_total" in metrics

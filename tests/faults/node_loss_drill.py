"""Run by test_node_loss.py, each scenario in a process of its own (the test session keeps its own local
Ray): a Ray cluster of three 1-CPU nodes on this machine (`ray.cluster_utils.Cluster`, as Ray's own
fault tests build one), one stage of the pipeline on it, and one non-head node killed while it works:
its raylet and every process it started are SIGKILLed, as when a pod's machine is pre-empted. A node of
the same size joins REPLACEMENT_S later, as KubeRay would start a new pod. Prints one JSON line.

  python tests/faults/node_loss_drill.py {curate|train|serve} RUNS_DIR CORPUS_DIR

on the tiny config with that runs_dir and corpus; `serve` serves the quantized model of a tiny run there.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import ray
import requests
from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
REPLACEMENT_S = 5
AFTER_S = 20  # serving: load goes on this long once the replacement node joined


def start_cluster() -> tuple[Cluster, list]:
    # a lost node is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s)
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": health})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    return cluster, nodes


def titles_on(node) -> list[str]:
    """The titles of the worker processes the node's raylet started (ray::<task or actor>)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    out = []
    for proc in raylet.children(recursive=True):
        try:
            out.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return out


def kill_when(cluster: Cluster, nodes: list, busy, running: threading.Thread) -> dict:
    """Kill the first non-head node on which `busy(titles)` holds, then add a replacement."""
    while running.is_alive():
        for node in nodes:
            seen = [t for t in titles_on(node) if busy(t)]
            if seen:
                killed_at = time.time()
                cluster.remove_node(node, allow_graceful=False)
                time.sleep(REPLACEMENT_S)
                cluster.add_node(num_cpus=1)
                return {"killed_while": seen[0].removeprefix("ray::").strip(), "killed_at": killed_at}
        time.sleep(0.02)
    return {}


def in_thread(work) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result.update(work())
        except Exception as e:  # noqa: BLE001 - the drill reports it; the test fails on it
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def curate(cluster, nodes, cfg) -> dict:
    from conftest import is_data_task
    from pipeline.curate.stage import run_curate

    thread, result = in_thread(lambda: run_curate(cfg))
    killed = kill_when(cluster, nodes, is_data_task, thread)
    thread.join(timeout=600)
    return {**killed, **result}


def train(cluster, nodes, cfg) -> dict:
    from pipeline.curate.stage import run_curate
    from pipeline.train.fit import step_reached
    from pipeline.train.stage import run_train

    run_curate(cfg)
    thread, result = in_thread(lambda: run_train(cfg))
    progress, at = cfg.stage_dir("train") / "pretrain", {}

    def past_a_checkpoint(title: str) -> bool:  # a worker of this node, and the step-5 checkpoint written
        at["step"] = step_reached(progress) or 0
        return title.startswith("ray::RayTrainWorker") and at["step"] >= 8

    killed = kill_when(cluster, nodes, past_a_checkpoint, thread)
    killed["step_at_kill"] = at.get("step")
    thread.join(timeout=900)
    state = json.loads((cfg.stage_dir("train") / "final" / "state.json").read_text()) if result else {}
    return {**killed, "error": result.get("error"), "step": state.get("step"), "resumed_at": state.get("resumed_at")}


def serve_load(cluster, nodes, cfg) -> dict:
    """8 clients send requests while a node with a model replica on it is lost and replaced, and for
    AFTER_S once the replacement joined."""
    from ray import serve

    from conftest import timed_generate
    from pipeline.serving.deploy import serve_args, wait_healthy
    from serve.app import build_app

    two = {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.4, "api_key_sha256": None}
    args = {**serve_args(cfg).model_dump(), **two}
    # one HTTP proxy, on the head: the nodes of this cluster share one machine's ports
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    serve.run(build_app(args), name="nodes", route_prefix="/nodes")
    url = f"http://127.0.0.1:{cfg.serve.port}/nodes"
    wait_healthy(url)
    results, lock, stop = [], threading.Lock(), threading.Event()

    def client(c: int) -> None:
        with requests.Session() as session:
            for i in range(c, 10**9, 8):
                if stop.is_set():
                    return
                result = timed_generate(url, i, session)
                with lock:
                    results.append(result)

    clients = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for thread in clients:
        thread.start()
    while len(results) < 100:
        time.sleep(0.05)
    killed = kill_when(cluster, nodes, lambda t: t.startswith("ray::ServeReplica:nodes:Generator"), clients[0])
    time.sleep(AFTER_S)
    stop.set()
    for thread in clients:
        thread.join()
    failed = [s for _, _, s in results if s != 200]
    # sent once the replacement had had 10 s to join (Ray declares the lost node dead within ~3 s)
    after = [s for start, _, s in results if start > killed.get("killed_at", 0) + REPLACEMENT_S + 10]
    latencies = sorted(latency for _, latency, _ in results)
    return {
        **killed,
        "requests": len(results),
        "failed": len(failed),
        "failed_by_status": dict(Counter(str(s) for s in failed)),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3),
        "latency_max_s": round(latencies[-1], 3),
        "requests_after_replacement": len(after),
        "failed_after_replacement": sum(s != 200 for s in after),
    }


def main() -> None:
    scenario, runs, corpus = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    from conftest import tiny_config

    overrides = ["train.cpus_per_worker=1", "train.max_steps=25", "train.checkpoint_every=5", "train.log_every=1"]
    cfg = tiny_config(runs, corpus, *overrides, "train.eval_every=100")
    cluster, nodes = start_cluster()
    try:
        out = {"curate": curate, "train": train, "serve": serve_load}[scenario](cluster, nodes, cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("DRILL " + json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main()

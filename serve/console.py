"""The console (pipeline.console) as a Ray Serve application, so that KubeRay users reach it beside the
endpoint: cluster/render.py puts it in the RayService at /console.

    serve run serve.console:build_console runs_dir=/mnt/runs endpoint=http://127.0.0.1:8000

Reached from other machines, it requires the API key: PIPELINE_API_KEY in the environment of whoever
builds the app (its hash travels to the replica, not the key)."""

from __future__ import annotations

import os
from pathlib import Path

from ray import serve
from ray.serve import Application

from pipeline.console.app import Settings, make_app, sha256


def build_console(args: dict) -> Application:
    key_sha256 = args.get("api_key_sha256") or sha256(os.environ.get(args.get("api_key_env", "PIPELINE_API_KEY")))
    if key_sha256 is None:
        raise ValueError("the console on a cluster is reachable by others: set PIPELINE_API_KEY (or api_key_sha256)")
    settings = Settings(
        runs_dir=Path(args.get("runs_dir", "runs")),
        endpoint=args.get("endpoint", "http://127.0.0.1:8000"),
        api_key_sha256=key_sha256,
        ray_jobs=True,  # Launch submits Ray jobs: to the dashboard at ray_address, or of the cluster it runs on
        ray_address=args.get("ray_address"),
        default_config=args.get("config", "configs/demo.yaml"),
    )

    # the app is built on the replica: one with its routes does not pickle. A plain function, as Serve
    # takes any other callable (a functools.partial, say) for the ASGI app itself
    def console_app():
        return make_app(settings)

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": float(args.get("num_cpus", 0.25))})
    @serve.ingress(console_app)
    class Console:
        pass

    return Console.bind()

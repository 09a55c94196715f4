"""Deploy the serve/ app on Ray Serve from our config, and talk to it over HTTP."""

from __future__ import annotations

import hashlib
import logging
import os
import time

import requests
from ray import serve

from pipeline.config import PipelineConfig
from pipeline.handoff import adapters_dir, served_model_dir
from pipeline.serving.schemas import ServeArgs

log = logging.getLogger("pipeline.serve")
APP_NAME = "llm"


def serve_args(cfg: PipelineConfig) -> ServeArgs:
    """The replicas' settings for the model this config's last quantize stage produced and the run's
    adapters; the API key (from serve.api_key_env) travels only as its SHA-256."""
    key = os.environ.get(cfg.serve.api_key_env)
    digest = hashlib.sha256(key.encode()).hexdigest() if key else None
    return ServeArgs.from_config(cfg, served_model_dir(cfg), digest, adapters_dir(cfg))


def deploy(cfg: PipelineConfig) -> str:
    """Start Serve on host:port (127.0.0.1 by default: set an API key before exposing it) and
    deploy the app; returns the base URL once it answers /healthz."""
    from serve.app import build_app

    args = serve_args(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(args.model_dump()), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    wait_healthy(url)
    log.info("serving %s at %s", args.model_dir, url)
    return url


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f}s")
        time.sleep(0.5)


def generate(url: str, prompt: str, max_new_tokens: int, api_key: str | None = None, model: str | None = None) -> dict:
    """One greedy answer from /generate; `model`: an adapter's name (default: the base model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, **({"model": model} if model else {})}
    r = requests.post(f"{url}/generate", json=body, headers=headers, timeout=120)
    r.raise_for_status()
    return r.json()

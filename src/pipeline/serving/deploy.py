"""Deploy the serve/ app on Ray Serve from our config, and talk to it over HTTP."""
from __future__ import annotations

import hashlib
import logging
import os
import time

import requests
from ray import serve

from pipeline.config import PipelineConfig
from pipeline.export.stage import served_model_dir
from pipeline.serving.schemas import ServeArgs

log = logging.getLogger("pipeline.serve")
# ServeConfig fields that a replica takes as they are
SHARED_FIELDS = {"engine", "max_new_tokens", "max_prompt_tokens", "max_batch_size", "batch_wait_timeout_s",
                 "max_queue", "request_timeout_s", "api_key_env", "min_replicas", "max_replicas",
                 "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "num_cpus", "num_gpus"}
APP_NAME = "llm"


def serve_args(cfg: PipelineConfig) -> ServeArgs:
    s = cfg.serve
    key = os.environ.get(s.api_key_env)
    return ServeArgs(model_dir=str(served_model_dir(cfg)), model_name=cfg.name,
                     api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if key else None,
                     **s.model_dump(include=SHARED_FIELDS))


def deploy(cfg: PipelineConfig) -> str:
    """Start Serve on host:port (127.0.0.1 by default: set an API key before exposing it) and
    deploy the app; returns the base URL once it answers /healthz."""
    from serve.app import build_app

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(serve_args(cfg).model_dump()), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    wait_healthy(url)
    log.info("serving %s at %s", served_model_dir(cfg), url)
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


def generate(url: str, prompt: str, max_new_tokens: int, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = requests.post(f"{url}/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens},
                      headers=headers, timeout=120)
    r.raise_for_status()
    return r.json()

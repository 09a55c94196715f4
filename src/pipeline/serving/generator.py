"""The model replicas: one engine each, behind the ingress (serve/app.py), which calls them through a
DeploymentHandle and retries a call whose replica died on a live one. This is the deployment that
autoscales; the transformers engine batches concurrent requests itself, vLLM batches continuously.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from ray import serve

from pipeline.serving.engines import load_engine
from pipeline.serving.schemas import ServeArgs
from pipeline.serving.types import Completion, Sampling


@serve.deployment
class Generator:
    def __init__(self, args: ServeArgs):
        self.registry = CollectorRegistry()
        batch = Histogram(
            "llm_batch_size",
            "requests per model.generate call (one model replica)",
            registry=self.registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
        )
        self.engine = load_engine(args, on_batch=batch.observe)

    async def complete(self, prompt: str, sampling: Sampling) -> Completion:
        return await self.engine.complete(prompt, sampling)

    async def stream(self, prompt: str, sampling: Sampling) -> AsyncIterator[str]:
        async for piece in self.engine.stream(prompt, sampling):
            yield piece

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

"""The model replicas: one engine each, behind the ingress (serve/app.py), which calls them through a
DeploymentHandle and retries a call whose replica died on a live one. This is the deployment that
autoscales; the transformers engine batches concurrent requests itself, vLLM batches continuously.

LoRA adapters are Ray Serve multiplexed models: a request for one carries its model id
(`name@version`, adapters.py), Serve sends it to a replica that has that adapter loaded when one does,
and a replica loads it on first use and unloads its least recently used one past `max_loras`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from ray import serve

from pipeline.serving.engines import load_engine
from pipeline.serving.schemas import ServeArgs
from pipeline.serving.types import Completion, Prompt, Sampling


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
        loaded = Gauge("llm_adapters_loaded", "LoRA adapters loaded on one model replica", registry=self.registry)
        self.engine = engine = load_engine(args, on_batch=batch.observe)

        async def load(model_id: str) -> Loaded:
            name = model_id.rpartition("@")[0]
            await engine.add_adapter(model_id, Path(args.adapters_dir) / name)
            loaded.inc()
            return Loaded(engine, model_id, loaded.dec)

        # built here, not as a decorated method: the bound on loaded adapters is a setting
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=args.max_loras)(load)

    async def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        await self._adapter_ready()
        return await self.engine.complete(prompt, sampling)

    async def stream(self, prompt: Prompt, sampling: Sampling) -> AsyncIterator[str]:
        await self._adapter_ready()
        async for piece in self.engine.stream(prompt, sampling):
            yield piece

    async def load(self) -> None:
        """Load the request's adapter (the ingress calls this before it serves a new adapter version)."""
        await self._adapter_ready()

    async def _adapter_ready(self) -> None:
        if model_id := serve.get_multiplexed_model_id():  # the request's Sampling.adapter
            await self.load_adapter(model_id)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


class Loaded:
    """What Serve's multiplexing holds for a loaded adapter; it calls `__del__` when the adapter is the
    least recently used one past the bound (and Python may call it again later: the second call is a
    no-op)."""

    def __init__(self, engine, model_id: str, on_unload: Callable[[], None]):
        self.engine, self.model_id, self.on_unload = engine, model_id, on_unload

    def __del__(self):
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.remove_adapter(self.model_id)
            self.on_unload()

"""The model replicas: one engine each, behind the ingress (serve/app.py), which calls them through a
DeploymentHandle and retries a call whose replica died on a live one. This is the deployment that
autoscales; the transformers engine batches with `@serve.batch`, vLLM batches continuously.
"""
from __future__ import annotations

from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from ray import serve
from starlette.concurrency import iterate_in_threadpool

from pipeline.serving.batching import BatchMerger
from pipeline.serving.engine import Completion, Sampling, load_engine
from pipeline.serving.schemas import ServeArgs


@serve.deployment
class Generator:
    def __init__(self, args: ServeArgs):
        self.engine = load_engine(args.model_dir, args.engine, max_num_seqs=args.max_queue)
        self.registry = CollectorRegistry()
        self.batch = Histogram("llm_batch_size", "requests per model.generate call (one model replica)",
                               registry=self.registry, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
        self.merger = BatchMerger(getattr(self.engine, "generate_batch", None), args.max_batch_size,
                                  fill_wait_s=args.batch_wait_timeout_s, on_batch=self.batch.observe)
        self._batched.set_max_batch_size(args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    # several small batches may be in flight at once: the merger joins them into one generate call
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=8)
    async def _batched(self, items: list[tuple[str, Sampling]]) -> list[Completion]:
        return await self.merger.run(items)

    async def complete(self, prompt: str, sampling: Sampling) -> Completion:
        if getattr(self.engine, "continuous_batching", False):
            return await self.engine.agenerate(prompt, sampling)
        return await self._batched((prompt, sampling))

    async def stream(self, prompt: str, sampling: Sampling) -> AsyncIterator[str]:
        if getattr(self.engine, "continuous_batching", False):
            async for piece in self.engine.astream(prompt, sampling):
                yield piece
        else:
            async for piece in iterate_in_threadpool(self.engine.stream(prompt, sampling)):
                yield piece

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

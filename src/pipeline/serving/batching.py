"""Dynamic batching for the transformers engine: concurrent requests share one `model.generate` call.

The merger runs one `generate_batch` at a time. When the model frees up it gives late arrivals a wait
window to join (clients whose answers just left come straight back), then takes every request waiting,
up to max_batch_size, into that one call: the batch size follows the load. (Ray Serve's `@serve.batch`
closes a batch when its wait window ends, even while the previous batch is still generating, so under
load it queues many small batches; it was used in front of this merger before, which made it redundant.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeline.serving.types import Completion, Prompt, Sampling


class BatchMerger:
    def __init__(
        self,
        generate_batch: Callable[[list[Prompt], list[Sampling]], list[Completion]],
        max_batch_size: int,
        fill_wait_s: float = 0.0,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        """`generate_batch` runs in a thread; `on_batch` hears each call's batch size (for metrics)."""
        self.generate_batch, self.max_batch_size, self.on_batch = generate_batch, max_batch_size, on_batch
        self.fill_wait_s = fill_wait_s
        self.pending: list[tuple[Prompt, Sampling, asyncio.Future]] = []
        self.busy = asyncio.Lock()

    async def run(self, prompt: Prompt, sampling: Sampling) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((prompt, sampling, future))
        async with self.busy:
            if not future.done():  # an earlier holder of the lock may have taken this request along
                await self._generate_pending()
        return await future

    async def _generate_pending(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fill_wait_s
        while len(self.pending) < self.max_batch_size and loop.time() < deadline:
            await asyncio.sleep(0.002)
        taken, self.pending = self.pending[: self.max_batch_size], self.pending[self.max_batch_size :]
        self.on_batch(len(taken))
        try:
            results = await asyncio.to_thread(self.generate_batch, [p for p, _, _ in taken], [s for _, s, _ in taken])
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error
            for _, _, future in taken:
                future.set_exception(e)
            return
        for (_, _, future), result in zip(taken, results):
            future.set_result(result)

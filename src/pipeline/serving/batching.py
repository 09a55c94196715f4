"""Merging of `@serve.batch` batches while the model is busy.

`@serve.batch` closes a batch when its wait window ends, even while the previous batch is still
generating, so under load it queues many small batches. The merger runs one `generate_batch` at a
time and, when the model frees up, gives late arrivals the same wait window to join, then takes
every batch waiting (up to max_batch_size requests) into that one call: the batch size follows the
load instead of the moment a wait window happened to close.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from pipeline.serving.engine import Completion, Sampling

Item = tuple[str, Sampling]


class BatchMerger:
    def __init__(self, generate_batch: Callable[[list[str], list[Sampling]], list[Completion]],
                 max_batch_size: int, fill_wait_s: float = 0.0, on_batch: Callable[[int], None] = lambda n: None):
        self.generate_batch, self.max_batch_size, self.on_batch = generate_batch, max_batch_size, on_batch
        self.fill_wait_s = fill_wait_s
        self.pending: list[tuple[list[Item], asyncio.Future]] = []
        self.busy = asyncio.Lock()

    async def run(self, items: list[Item]) -> list[Completion]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((items, future))
        async with self.busy:
            if not future.done():
                await self._generate_pending()
        return await future

    def _take(self) -> list[tuple[list[Item], asyncio.Future]]:
        taken, size = [], 0
        while self.pending and (not taken or size + len(self.pending[0][0]) <= self.max_batch_size):
            group = self.pending.pop(0)
            taken.append(group)
            size += len(group[0])
        return taken

    def _pending_size(self) -> int:
        return sum(len(group) for group, _ in self.pending)

    async def _generate_pending(self) -> None:
        # clients whose answers just left come straight back: give them a moment to join this batch
        deadline = asyncio.get_running_loop().time() + self.fill_wait_s
        while self._pending_size() < self.max_batch_size and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.002)
        taken = self._take()
        items = [item for group, _ in taken for item in group]
        self.on_batch(len(items))
        try:
            results = await asyncio.to_thread(self.generate_batch, [p for p, _ in items], [s for _, s in items])
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error
            for _, future in taken:
                future.set_exception(e)
            return
        start = 0
        for group, future in taken:
            future.set_result(results[start:start + len(group)])
            start += len(group)

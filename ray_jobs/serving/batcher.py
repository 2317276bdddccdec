"""The replica's batching: a batch is formed when the forward is free, from every request waiting.

Serve's `@serve.batch` forms a batch each time its wait window closes, as requests arrive, and
queues the batches behind the one running; under load the forward then runs many small batches
(2.4 images on average at 32 clients with a batch of 16, `bench/serve_load.py`). Here requests wait
in one queue and a single loop takes up to `max_batch_size` of them whenever the previous forward
has finished: the longer a forward runs, the fuller the next batch. When fewer are waiting than a
batch holds, it waits up to `wait_s` for more (a lone request pays at most that).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class GreedyBatcher(Generic[Item, Answer]):
    """`await submit(item)` returns `run(batch)[i]` for the batch the item went into."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Answer]]], max_batch_size: int,
                 wait_s: float) -> None:
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Answer]]] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Answer:
        if self._queue is None:  # created on the replica's event loop, at the first request
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._batches())
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[Item, asyncio.Future[Answer]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # drop requests given up on

    async def _batches(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                answers = await self.run([item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 - every request of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)

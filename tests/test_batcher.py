"""The replica's batching: batches fill while the forward runs, answers go back to their own requests."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from ray_jobs.serving.batcher import GreedyBatcher


def run_batches(count: int, max_batch_size: int, forward_s: float, arrive_every_s: float = 0.0,
                fail: bool = False) -> tuple[list[int], list[object]]:
    sizes: list[int] = []

    async def forward(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(forward_s)  # the forward thread is busy; requests keep arriving
        if fail:
            raise RuntimeError("forward failed")
        return [item * 10 for item in items]

    async def main() -> list[object]:
        batcher = GreedyBatcher(forward, max_batch_size, wait_s=0.01)

        async def client(item: int) -> object:
            await asyncio.sleep(item * arrive_every_s)
            try:
                return await batcher.submit(item)
            except RuntimeError as err:
                return str(err)

        return list(await asyncio.gather(*(client(item) for item in range(count))))

    # A thread of its own: an earlier test in the session may leave an event loop running on this one.
    with ThreadPoolExecutor(1) as thread:
        return sizes, thread.submit(asyncio.run, main()).result()


def test_requests_arriving_during_a_forward_fill_the_next_batch():
    # One request every 5 ms, a 50 ms forward: Serve's batching would run ~5-request batches every
    # 10 ms window, queued; here each batch takes everything that arrived during the last forward.
    sizes, answers = run_batches(count=40, max_batch_size=16, forward_s=0.05, arrive_every_s=0.005)
    assert answers == [item * 10 for item in range(40)]
    assert max(sizes) <= 16 and sum(sizes) == 40
    assert sizes[0] <= 3 and min(sizes[1:-1]) >= 8, sizes  # after the first, ~10 arrive per forward


def test_a_lone_request_waits_only_for_the_window():
    sizes, answers = run_batches(count=1, max_batch_size=16, forward_s=0.0)
    assert sizes == [1] and answers == [0]


def test_a_failed_forward_fails_every_request_of_its_batch_and_the_next_batch_runs():
    sizes, answers = run_batches(count=5, max_batch_size=16, forward_s=0.0, fail=True)
    assert answers == ["forward failed"] * 5 and sum(sizes) == 5


@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_no_batch_is_larger_than_the_limit(max_batch_size):
    sizes, answers = run_batches(count=10, max_batch_size=max_batch_size, forward_s=0.001)
    assert max(sizes) <= max_batch_size and answers == [item * 10 for item in range(10)]

"""Training order, global batches and augmentation seeds as a pure function of (seed, epoch, sample).

`epoch_order` shuffles the row groups, then the rows within windows of row groups of at most
`READ_WINDOW_BYTES` (a split that small is one window: a full permutation). Global batch k is
positions `[k*B, (k+1)*B)` of that order, whatever the number of workers; `SeededShardSampler` hands
each rank its slice of every global batch (`rank_slice`: sizes differ by at most one) with a
per-sample augmentation seed. So 1, 2 or 4 workers train on the same global batches in the same
order, every rank runs the same number of steps (`steps_per_epoch`, the per-step center all-reduce
needs that), and a run resumed on any number of workers replays exactly the batches and crops an
uninterrupted run would have seen. The price: each rank reads rows from every row group of a
window, so the reader caches a window per rank (its memory bound is unchanged).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ray_jobs.data.parquet import READ_WINDOW_BYTES, Block


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's random crop and flip in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(blocks: Sequence[Block], seed: int, epoch: int, window_bytes: int = READ_WINDOW_BYTES) -> list[int]:
    """Every row of the split once, in this epoch's seeded order.

    Row groups are shuffled, then rows within consecutive windows of row groups of at most
    `window_bytes`. A split within one window gets `torch.randperm(rows)` seeded with
    `seed + epoch`: exactly `DistributedSampler`'s order.
    """
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    if sum(block.image_bytes for block in blocks) <= window_bytes:
        return torch.randperm(sum(block.rows for block in blocks), generator=generator).tolist()
    order: list[int] = []
    window: list[Block] = []
    for i in torch.randperm(len(blocks), generator=generator).tolist():
        if window and sum(b.image_bytes for b in window) + blocks[i].image_bytes > window_bytes:
            order += _shuffled_rows(window, generator)
            window = []
        window.append(blocks[i])
    return order + _shuffled_rows(window, generator)


def _shuffled_rows(window: list[Block], generator: torch.Generator) -> list[int]:
    rows = torch.cat([torch.arange(block.start, block.start + block.rows) for block in window])
    return rows[torch.randperm(len(rows), generator=generator)].tolist()


def steps_per_epoch(rows: int, global_batch: int) -> int:
    """Optimizer steps in one epoch: the last partial batch is dropped when there are two full ones,
    else the order wraps around to fill it (every global batch is full)."""
    return rows // global_batch if rows >= 2 * global_batch else math.ceil(rows / global_batch)


def rank_slice(size: int, rank: int, world: int) -> range:
    """This rank's positions among `size` items split over `world` ranks: consecutive, sizes differ by
    at most one, never empty when size >= world."""
    world = max(world, 1)
    return range(rank * size // world, (rank + 1) * size // world)


class SeededShardSampler(Sampler[tuple[int, int]]):
    """This rank's slice of every global batch of `epoch_order`, as `(index, augmentation seed)` keys.

    Load it with `batch_size=len(sampler.share)`: each loader batch is then this rank's part of one
    global batch. Call `set_epoch` before each epoch, as with `DistributedSampler`.
    """

    def __init__(self, blocks: Sequence[Block], rank: int, world: int, seed: int, global_batch: int,
                 window_bytes: int = READ_WINDOW_BYTES) -> None:
        self.blocks, self.rank, self.world, self.seed = list(blocks), rank, max(world, 1), seed
        if global_batch < self.world:
            raise ValueError(f"a global batch of {global_batch} cannot give each of {self.world} workers a sample")
        self.global_batch, self.window_bytes = global_batch, window_bytes
        self.epoch = 0
        self.steps = steps_per_epoch(sum(block.rows for block in self.blocks), global_batch)
        self.share = rank_slice(global_batch, rank, self.world)
        self.num_samples = self.steps * len(self.share)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.blocks, self.seed, self.epoch, self.window_bytes)
        total = self.steps * self.global_batch
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        for step in range(self.steps):
            for position in self.share:
                index = order[step * self.global_batch + position]
                yield index, augmentation_seed(self.seed, self.epoch, index)

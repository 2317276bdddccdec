"""Training order and augmentation seeds as a pure function of (seed, epoch, sample).

`SeededShardSampler` shuffles the row groups, then the rows within windows of row groups of at
most `READ_WINDOW_BYTES` (a split that small is one window: a full permutation), and hands each rank
one contiguous part of that order with a per-sample augmentation seed. A rank therefore reads only
its own row groups, every rank runs the same number of steps, and a run resumed from a checkpoint
replays exactly the batches and crops an uninterrupted run would have seen, whatever the number of
loader workers.
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


class SeededShardSampler(Sampler[tuple[int, int]]):
    """This rank's contiguous part of `epoch_order`, as `(index, augmentation seed)` keys.

    Every rank gets `ceil(rows / world)` samples (the order wraps around to fill the last part), so
    every rank runs the same number of steps: the per-step center all-reduce needs that.
    Call `set_epoch` before each epoch, as with `DistributedSampler`.
    """

    def __init__(self, blocks: Sequence[Block], rank: int, world: int, seed: int,
                 window_bytes: int = READ_WINDOW_BYTES) -> None:
        self.blocks, self.rank, self.world, self.seed = list(blocks), rank, max(world, 1), seed
        self.window_bytes = window_bytes
        self.epoch = 0
        self.num_samples = math.ceil(sum(block.rows for block in self.blocks) / self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.blocks, self.seed, self.epoch, self.window_bytes)
        total = self.num_samples * self.world
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        for index in order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]:
            yield index, augmentation_seed(self.seed, self.epoch, index)



def contiguous_share(rows: int, rank: int, world: int) -> range:
    """This rank's consecutive rows of a split (so it reads only its own row groups); shares may be empty."""
    size = math.ceil(rows / max(world, 1))
    return range(min(rank * size, rows), min((rank + 1) * size, rows))

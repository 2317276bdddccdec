"""The training sampler: equal steps on every rank, order and crops a pure function of (seed, epoch, sample)."""

from __future__ import annotations

import pytest
import torch

from ray_jobs.data import ParquetImageDataset, SeededShardSampler, train_transform


class _Sized(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 64, 255, 256, 257])
def test_every_rank_gets_the_same_number_of_samples_and_all_rows_are_covered(world, rows):
    shares = []
    for rank in range(world):
        sampler = SeededShardSampler(_Sized(rows), rank, world, seed=7)
        sampler.set_epoch(3)
        shares.append([index for index, _ in sampler])
    assert len({len(share) for share in shares}) == 1, "unequal shares would hang the per-step all-reduce"
    assert set().union(*shares) == set(range(rows))


def test_order_follows_the_seed_and_the_epoch_and_ranks_never_share_a_stream():
    def keys(seed: int, epoch: int, rank: int) -> list[tuple[int, int]]:
        sampler = SeededShardSampler(_Sized(100), rank, 2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert keys(0, 1, 0) == keys(0, 1, 0)
    assert keys(0, 1, 0) != keys(1, 1, 0) and keys(0, 1, 0) != keys(0, 2, 0)
    rank0, rank1 = keys(0, 1, 0), keys(0, 1, 1)
    assert not {seed for _, seed in rank0} & {seed for _, seed in rank1}
    assert not {index for index, _ in rank0} & {index for index, _ in rank1}


def test_a_sample_is_augmented_the_same_way_whatever_ran_before(tiny_dataset):
    dataset = ParquetImageDataset(tiny_dataset, "train", train_transform(image_size=32), limit=4)
    first, _ = dataset[(2, 12345)]
    torch.rand(1000)  # another consumer of the global stream in between
    again, _ = dataset[(2, 12345)]
    other, _ = dataset[(2, 54321)]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    state = torch.get_rng_state()
    dataset[(1, 99)]
    assert torch.equal(state, torch.get_rng_state()), "seeded access must not move the caller's RNG"

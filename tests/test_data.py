"""The training sampler: equal steps on every rank, order and crops a pure function of (seed, epoch, sample)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from ray_jobs.data import IMAGENET, Normalization, ParquetImageDataset, SeededShardSampler, eval_transform, train_transform


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
    dataset = ParquetImageDataset(tiny_dataset, "train", train_transform(image_size=32, norm=IMAGENET, min_crop_scale=0.08), limit=4)
    first, _ = dataset[(2, 12345)]
    torch.rand(1000)  # another consumer of the global stream in between
    again, _ = dataset[(2, 12345)]
    other, _ = dataset[(2, 54321)]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    state = torch.get_rng_state()
    dataset[(1, 99)]
    assert torch.equal(state, torch.get_rng_state()), "seeded access must not move the caller's RNG"


def test_crop_strength_is_a_parameter():
    """min_crop_scale=1 keeps the whole picture (only flips differ); 0.08 crops vary from sample to sample."""
    ramp = torch.arange(64, dtype=torch.uint8).repeat(3, 64, 1) * 4  # a left-to-right gradient, 64 x 64
    whole = v2.Compose([v2.Resize(32, antialias=True), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(IMAGENET.mean, IMAGENET.std)])(ramp)
    gentle = train_transform(image_size=32, norm=IMAGENET, min_crop_scale=1.0)
    strong = train_transform(image_size=32, norm=IMAGENET, min_crop_scale=0.08)
    outputs = {"gentle": [], "strong": []}
    for seed in range(8):
        torch.manual_seed(seed)
        outputs["gentle"].append(gentle(ramp))
        torch.manual_seed(seed)
        outputs["strong"].append(strong(ramp))
    for image in outputs["gentle"]:
        assert torch.allclose(image, whole, atol=1e-5) or torch.allclose(image, whole.flip(-1), atol=1e-5)
    distinct = {tuple(image[0, 0].tolist()) for image in outputs["strong"]}
    assert len(distinct) == 8, "strong crops of a gradient differ per sample"


def test_eval_transform_uses_the_given_normalisation():
    grey = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    half = eval_transform(image_size=32, norm=Normalization(mean=(0.5,) * 3, std=(0.5,) * 3))(grey)
    assert torch.allclose(half, torch.full_like(half, (128 / 255 - 0.5) / 0.5), atol=1e-5)

"""The training data path: equal steps on every rank, order and crops a pure function of (seed,
epoch, sample), each rank reading its own row groups, and a reader whose memory is bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from ray_jobs.data.parquet import Block, ParquetImageDataset, read_split
from ray_jobs.data.sampler import SeededShardSampler
from ray_jobs.data.transforms import IMAGENET, Normalization, eval_transform, train_transform


def _blocks(rows: int, per_block: int, block_bytes: int = 100) -> list[Block]:
    return [Block(start, min(per_block, rows - start), block_bytes) for start in range(0, rows, per_block)]


def _shares(blocks: list[Block], world: int, global_batch: int = 6, seed: int = 7, epoch: int = 3,
            window_bytes: int = 250) -> list[list[int]]:
    shares = []
    for rank in range(world):
        sampler = SeededShardSampler(blocks, rank, world, seed, global_batch, window_bytes=window_bytes)
        sampler.set_epoch(epoch)
        shares.append([index for index, _ in sampler])
    return shares


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 64, 255, 256, 257])
@pytest.mark.parametrize("per_block", [1, 7, 64])
def test_every_rank_runs_the_same_steps_and_an_epoch_covers_the_split(world, rows, per_block):
    batch = 6
    shares = _shares(_blocks(rows, per_block), world, batch)
    samplers = [SeededShardSampler(_blocks(rows, per_block), r, world, 7, batch) for r in range(world)]
    loaders = [DataLoader(range(rows), sampler=sampler, batch_size=len(sampler.share)) for sampler in samplers]
    assert len({len(loader) for loader in loaders}) == 1, "unequal step counts would hang the per-step all-reduce"
    assert max(map(len, shares)) - min(map(len, shares)) <= len(loaders[0]), "shares differ by at most one a step"
    covered = set().union(*shares)
    assert sum(map(len, shares)) == len(loaders[0]) * batch, "every global batch is full"
    if rows < 2 * batch:  # one or two batches: the order wraps to fill them, every row is seen
        assert covered == set(range(rows))
    else:  # the last partial batch is dropped, as DataLoader's drop_last does
        assert len(covered) == rows // batch * batch and covered <= set(range(rows))


def test_a_split_within_one_window_gets_distributed_samplers_order():
    """Single-worker runs see exactly the order of the whole-split reader the figures were made with."""
    class Sized(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 100

    for seed, epoch in ((0, 0), (3, 5)):
        reference = DistributedSampler(Sized(), num_replicas=1, rank=0, shuffle=True, seed=seed)
        reference.set_epoch(epoch)
        sampler = SeededShardSampler([Block(0, 60, 10), Block(60, 40, 10)], 0, 1, seed, global_batch=10)
        sampler.set_epoch(epoch)
        assert [index for index, _ in sampler] == list(reference)


def test_the_global_batches_are_the_same_on_any_number_of_workers():
    """Step k trains on the same samples, with the same augmentation seeds, on 1, 2, 3 or 5 workers."""
    blocks, batch = _blocks(300, per_block=10), 10

    def global_batches(world: int) -> list[list[tuple[int, int]]]:
        samplers = [SeededShardSampler(blocks, rank, world, 7, batch, window_bytes=250) for rank in range(world)]
        for sampler in samplers:
            sampler.set_epoch(3)
        parts = [list(DataLoader(list(sampler), batch_size=len(sampler.share), collate_fn=list))
                 for sampler in samplers]
        return [[key for rank in range(world) for key in parts[rank][step]] for step in range(len(parts[0]))]

    one = global_batches(1)
    assert len(one) == 30
    for world in (2, 3, 5):
        assert global_batches(world) == one


def test_order_follows_the_seed_and_the_epoch_and_ranks_never_share_a_stream():
    def keys(seed: int, epoch: int, rank: int) -> list[tuple[int, int]]:
        sampler = SeededShardSampler(_blocks(100, 10), rank, 2, seed=seed, global_batch=10, window_bytes=250)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert keys(0, 1, 0) == keys(0, 1, 0)
    assert keys(0, 1, 0) != keys(1, 1, 0) and keys(0, 1, 0) != keys(0, 2, 0)
    rank0, rank1 = keys(0, 1, 0), keys(0, 1, 1)
    assert not {seed for _, seed in rank0} & {seed for _, seed in rank1}
    assert not {index for index, _ in rank0} & {index for index, _ in rank1}


def test_a_global_batch_smaller_than_the_workers_is_refused():
    with pytest.raises(ValueError, match="global batch of 2"):
        SeededShardSampler(_blocks(10, 5), 0, 3, seed=0, global_batch=2)


def write_split(root: Path, rows: list[bytes], rows_per_group: int, rows_per_shard: int) -> str:
    """A minimal ingested dataset (manifest + train shards) with the given image bytes, label = row % 3."""
    shards = []
    (root / "train").mkdir(parents=True)
    for first in range(0, len(rows), rows_per_shard):
        chunk = rows[first:first + rows_per_shard]
        table = pa.table({"image": pa.array(chunk, pa.binary()),
                          "label": pa.array([(first + i) % 3 for i in range(len(chunk))], pa.int32())})
        name = f"train/part-{len(shards):05d}.parquet"
        pq.write_table(table, root / name, row_group_size=rows_per_group, compression="none")
        shards.append(name)
    manifest = {"classes": ["a", "b", "c"], "shards": {"train": shards}, "counts": {"train": {"a": len(rows)}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_the_reader_returns_every_row_and_caches_a_bounded_number_of_row_groups(tmp_path, monkeypatch):
    import ray_jobs.data.parquet as data

    rows = [f"row {i:04d} ".encode() * 100 for i in range(200)]  # 1 KB each
    dataset_uri = write_split(tmp_path / "ds", rows, rows_per_group=8, rows_per_shard=50)
    monkeypatch.setattr(data, "READ_WINDOW_BYTES", 20_000)  # about 2.5 row groups
    dataset = ParquetImageDataset(dataset_uri, "train", transform=None)
    assert len(dataset.blocks) == 4 * 7  # 50-row shards in row groups of 8: 8*6 + 2
    sampler = SeededShardSampler(dataset.blocks, 0, 1, seed=0, global_batch=8, window_bytes=data.READ_WINDOW_BYTES)
    for index, _ in sampler:
        assert dataset.image_bytes(index) == rows[index]
    assert dataset.labels.tolist() == [i % 3 for i in range(200)]
    assert 0 < dataset.cache.peak_bytes <= dataset.cache.budget_bytes < 40_000, "cache grew with the split"
    limited = ParquetImageDataset(dataset_uri, "train", transform=None, limit=57)
    assert len(limited) == 57 and limited.image_bytes(56) == rows[56]
    with pytest.raises(IndexError):
        limited.image_bytes(57)
    assert read_split(dataset_uri, "train").column("image").to_pylist() == rows


@pytest.mark.parametrize(("augment", "erasing"), [("crop_flip", 0.0), ("trivialaugment", 0.5), ("randaugment", 0.5)])
def test_a_sample_is_augmented_the_same_way_whatever_ran_before(tiny_dataset, augment, erasing):
    """Every draw comes from the per-sample seeded torch generator (not Python's `random`), so resume is exact."""
    import random

    transform = train_transform(image_size=32, norm=IMAGENET, min_crop_scale=0.08, interpolation="bicubic",
                                augment=augment, random_erasing=erasing)
    dataset = ParquetImageDataset(tiny_dataset, "train", transform, limit=4)
    first, _ = dataset[(2, 12345)]
    torch.rand(1000)  # another consumer of the global stream in between
    random.random()  # and of Python's
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

"""Parquet shards of `train-food ingest` as torch datasets, with train and eval transform presets.

A split is read one Parquet row group at a time: a map-style dataset knows only where each row
group starts and every row's label, and keeps a small cache of row groups (their *encoded*
images, bounded by `READ_WINDOW_BYTES`, never the whole split). Decoding and augmentation run in
DataLoader workers, one image per `__getitem__`. So a worker's memory does not grow with the
split, a split of any size reads (no 2 GiB array), and nothing is pickled to spawned loaders.

Training order and augmentation are a pure function of (seed, epoch, sample): `SeededShardSampler`
shuffles the row groups, then the rows within windows of row groups of at most `READ_WINDOW_BYTES`
(a split that small is one window: a full permutation), and hands each rank one contiguous part
of that order with a per-sample augmentation seed. A rank therefore reads only its own row groups,
every rank runs the same number of steps, and a run resumed from a checkpoint replays exactly the
batches and crops an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from ray_jobs.decode import decode_rgb
from ray_jobs.errors import UserInputError
from ray_jobs.storage import filesystem

SPLITS = ("train", "val", "test")

# Rows are shuffled within windows of row groups this large, and a reader caches about this much.
# 128 MiB holds food101_mini10's train split at 512 px whole, so its order is a full permutation.
READ_WINDOW_BYTES = 128 * 2**20


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the inputs a backbone's weights were trained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def train_transform(*, image_size: int, norm: Normalization, min_crop_scale: float) -> v2.Compose:
    """Random resized crop (area share `min_crop_scale`..1 of the image) + flip, then float and `norm`.

    torchvision's default 0.08 lower bound is for long ImageNet schedules; short fine-tuning runs on
    small images learn more from gentler crops, so the strength is a parameter.
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(norm.mean, norm.std),
        ]
    )


def eval_transform(*, image_size: int, norm: Normalization) -> v2.Compose:
    """Resize to 256/224 of the crop, then center crop: the torchvision reference's eval preset."""
    return v2.Compose(
        [
            v2.Resize(round(image_size * 256 / 224), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(norm.mean, norm.std),
        ]
    )


def load_manifest(dataset_uri: str) -> dict:
    """Read `manifest.json`, with a clear error when the path is not an ingested dataset."""
    fs, root = filesystem(dataset_uri)
    path = f"{root.rstrip('/')}/manifest.json"
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError) as err:
        raise UserInputError(
            f"dataset {dataset_uri!r} has no manifest.json: run `train-food ingest` first ({err})"
        ) from None


def _shard_paths(dataset_uri: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The split's shards as the manifest lists them: files it does not list are never read.

    Publishing to an object store puts the new shards next to the old ones before the new
    manifest replaces the old one (see `tasks.ingest_store`), so listing the split folder could
    mix two builds; the manifest names exactly one.
    """
    fs, root = filesystem(dataset_uri)
    shards = load_manifest(dataset_uri).get("shards", {}).get(split)
    if not shards:
        raise UserInputError(f"dataset {dataset_uri!r} has no {split!r} split in its manifest")
    if any(not isinstance(s, str) or s.startswith("/") or ".." in s.split("/") for s in shards):
        raise UserInputError(f"dataset {dataset_uri!r}: manifest lists shards outside the dataset folder")
    return fs, [f"{root.rstrip('/')}/{shard}" for shard in shards]


def _split_dataset(dataset_uri: str, split: str) -> pads.Dataset:
    fs, paths = _shard_paths(dataset_uri, split)
    return pads.dataset(paths, format="parquet", filesystem=fs)


def read_split(dataset_uri: str, split: str, limit: int | None = None) -> pa.Table:
    """The `image` and `label` columns of one split, optionally only its first `limit` rows (small splits only)."""
    table = _split_dataset(dataset_uri, split).to_table(columns=["image", "label"])
    return table.slice(0, limit) if limit is not None else table


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's random crop and flip in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Block:
    """One Parquet row group of a split: the unit that is read, cached and shuffled as a whole."""

    start: int  # the split's row number of its first row
    rows: int
    image_bytes: int  # stored size of its image column
    shard: str = ""  # file path on the dataset's file system
    row_group: int = 0


def split_blocks(dataset_uri: str, split: str, limit: int | None = None) -> list[Block]:
    """The split's row groups in row order (from the Parquet footers only), cut at `limit` rows."""
    fs, paths = _shard_paths(dataset_uri, split)
    blocks: list[Block] = []
    start = 0
    for path in paths:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        image_column = meta.schema.names.index("image") if "image" in meta.schema.names else 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if limit is not None:
                rows = min(rows, limit - start)
            if rows <= 0:
                return blocks
            size = meta.row_group(group).column(image_column).total_compressed_size
            blocks.append(Block(start, rows, size, path, group))
            start += rows
    return blocks


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


class RowGroupCache:
    """Encoded images of the most recently used row groups, at most about `budget_bytes` of them."""

    def __init__(self, fs: pafs.FileSystem, budget_bytes: int) -> None:
        self.fs, self.budget_bytes = fs, budget_bytes
        self.groups: OrderedDict[tuple[str, int], pa.ChunkedArray] = OrderedDict()
        self.cached_bytes = 0
        self.peak_bytes = 0

    def images(self, block: Block) -> pa.ChunkedArray:
        key = (block.shard, block.row_group)
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        with self.fs.open_input_file(block.shard) as handle:
            images = pq.ParquetFile(handle).read_row_group(block.row_group, columns=["image"]).column("image")
        while self.groups and self.cached_bytes + images.nbytes > self.budget_bytes:
            self.cached_bytes -= self.groups.popitem(last=False)[1].nbytes
        self.groups[key] = images
        self.cached_bytes += images.nbytes
        self.peak_bytes = max(self.peak_bytes, self.cached_bytes)
        return images


class ParquetImageDataset(Dataset):
    """One split of an ingested dataset: (image tensor, label) pairs decoded on access.

    Holds the row-group index and the labels; image bytes come through a `RowGroupCache` made
    lazily in each process (never pickled). Indexed by an int (the transform draws from torch's
    global RNG) or by `(index, seed)` from `SeededShardSampler` (the transform draws from a
    generator seeded with `seed`).
    """

    def __init__(self, dataset_uri: str, split: str, transform: v2.Compose, limit: int | None = None):
        self.dataset_uri = dataset_uri
        self.split = split
        self.transform = transform
        self.blocks = split_blocks(dataset_uri, split, limit)
        self._starts = [block.start for block in self.blocks]
        rows = sum(block.rows for block in self.blocks)
        labels = _split_dataset(dataset_uri, split).to_table(columns=["label"]).column("label").slice(0, rows)
        self.labels = torch.tensor(labels.to_numpy(), dtype=torch.long)
        self._cache: RowGroupCache | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # Loader workers open their own cache instead of receiving a pickled copy.
        return {**self.__dict__, "_cache": None}

    @property
    def cache(self) -> RowGroupCache:
        if self._cache is None:
            largest = max((block.image_bytes for block in self.blocks), default=0)
            self._cache = RowGroupCache(filesystem(self.dataset_uri)[0], READ_WINDOW_BYTES + 2 * largest)
        return self._cache

    def image_bytes(self, index: int) -> bytes:
        """The stored (encoded) image of one row, reading its row group if it is not cached."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a split of {len(self)} rows")
        block = self.blocks[bisect.bisect_right(self._starts, index) - 1]
        return self.cache.images(block)[index - block.start].as_py()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        pixels = decode_rgb(self.image_bytes(index), f"dataset {self.dataset_uri} split {self.split} row {index}")
        if seed is None:
            return self.transform(pixels), int(self.labels[index])
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            # The CPU generator only: `torch.manual_seed` also reseeds every accelerator (~100x slower).
            torch.default_generator.manual_seed(seed)
            return self.transform(pixels), int(self.labels[index])


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about an ingested dataset."""

    classes: list[str]
    fingerprint: str
    rows: dict[str, int]  # per split, from the manifest (checked against the shards for required splits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dataset_info(dataset_uri: str, required_splits: tuple[str, ...] = ("train", "val")) -> DatasetInfo:
    """Classes (index = label) and fingerprint, after checking the manifest matches the shards."""
    manifest = load_manifest(dataset_uri)
    classes = manifest.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise UserInputError(f"dataset {dataset_uri!r}: manifest lists {classes!r} as classes; need at least 2")
    counts = manifest.get("counts", {})
    for split in required_splits:
        expected = sum((counts.get(split) or {}).values())
        if expected == 0:
            raise UserInputError(f"dataset {dataset_uri!r}: manifest has no rows in split {split!r}")
        shards = _split_dataset(dataset_uri, split)
        missing = {"image", "label"} - set(shards.schema.names)
        if missing:
            raise UserInputError(f"dataset {dataset_uri!r}: split {split!r} lacks the columns {sorted(missing)}")
        rows = shards.count_rows()
        if rows != expected:
            raise UserInputError(
                f"dataset {dataset_uri!r}: manifest counts {expected} rows in split {split!r} but its shards "
                f"hold {rows}; re-run `train-food ingest --force`"
            )
    rows = {split: sum((counts.get(split) or {}).values()) for split in SPLITS}
    return DatasetInfo(classes=list(classes), fingerprint=str(manifest.get("fingerprint", "")), rows=rows)

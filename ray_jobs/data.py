"""Parquet shards of `train-food ingest` as torch datasets, with train and eval transform presets.

A map-style dataset keeps each split's *encoded* images in memory (JPEG bytes are ~10x smaller
than decoded pixels) and decodes one image per `__getitem__`, so decoding and augmentation run in
DataLoader workers. The table is loaded lazily in each process and never pickled, so spawned
loader workers start cheaply.

Training order and augmentation are a pure function of (seed, epoch, sample): `SeededShardSampler`
hands each rank its share of a seeded permutation together with a per-sample augmentation seed.
So a run resumed from a checkpoint replays exactly the batches and crops an uninterrupted run would
have seen, whatever the number of loader workers, and no two ranks share an augmentation stream.
"""

from __future__ import annotations

import json
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import v2

from ray_jobs.decode import decode_rgb
from ray_jobs.errors import UserInputError

SPLITS = ("train", "val", "test")


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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of a URI (`s3://...`) or of a local path."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), uri


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


def _split_dataset(dataset_uri: str, split: str) -> pads.Dataset:
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
    return pads.dataset([f"{root.rstrip('/')}/{shard}" for shard in shards], format="parquet", filesystem=fs)


def read_split(dataset_uri: str, split: str, limit: int | None = None) -> pa.Table:
    """The `image` and `label` columns of one split, optionally only its first `limit` rows."""
    table = _split_dataset(dataset_uri, split).to_table(columns=["image", "label"])
    return table.slice(0, limit) if limit is not None else table


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's random crop and flip in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededShardSampler(DistributedSampler):
    """This rank's share of a permutation seeded by (`seed`, epoch), as `(index, augmentation seed)` keys.

    Every rank gets the same number of samples (the permutation is padded by wrapping around), so
    every rank runs the same number of steps: the per-step center all-reduce needs that.
    Call `set_epoch` before each epoch, as with `DistributedSampler`.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=max(world, 1), rank=rank, shuffle=True, seed=seed, drop_last=False)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in super().__iter__():
            yield index, augmentation_seed(self.seed, self.epoch, index)


class ParquetImageDataset(Dataset):
    """One split of an ingested dataset: (image tensor, label) pairs decoded on access.

    Indexed by an int (the transform draws from torch's global RNG) or by `(index, seed)` from
    `SeededShardSampler` (the transform draws from a generator state seeded with `seed`).
    """

    def __init__(self, dataset_uri: str, split: str, transform: v2.Compose, limit: int | None = None):
        self.dataset_uri = dataset_uri
        self.split = split
        self.transform = transform
        self.limit = limit
        table = read_split(dataset_uri, split, limit)
        self.labels = torch.tensor(table.column("label").to_numpy(), dtype=torch.long)
        self._images: pa.ChunkedArray | None = table.column("image").combine_chunks()

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # Loader workers reload the bytes themselves instead of receiving a pickled copy.
        return {**self.__dict__, "_images": None}

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self._images is None:
            self._images = read_split(self.dataset_uri, self.split, self.limit).column("image").combine_chunks()
        pixels = decode_rgb(self._images[index].as_py(), f"dataset {self.dataset_uri} split {self.split} row {index}")
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

"""Parquet shards of `train-food ingest` as a torch dataset, read one row group at a time.

A map-style dataset knows only where each row group starts and every row's label, and keeps a
small cache of row groups (their *encoded* images, bounded by `READ_WINDOW_BYTES`, never the whole
split). Decoding and augmentation run in DataLoader workers, one image per `__getitem__`. So a
worker's memory does not grow with the split, a split of any size reads (no 2 GiB array), and
nothing is pickled to spawned loaders. The order comes from `ray_jobs.data.sampler`.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ray_jobs.data.decode import decode_rgb
from ray_jobs.dataset_format import shard_paths, split_dataset
from ray_jobs.storage import filesystem

# Rows are shuffled within windows of row groups this large, and a reader caches about this much.
# 128 MiB holds food101_mini10's train split at 512 px whole, so its order is a full permutation.
READ_WINDOW_BYTES = 128 * 2**20


def read_split(dataset_uri: str, split: str, limit: int | None = None) -> pa.Table:
    """The `image` and `label` columns of one split, optionally only its first `limit` rows (small splits only)."""
    table = split_dataset(dataset_uri, split).to_table(columns=["image", "label"])
    return table.slice(0, limit) if limit is not None else table



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
    fs, paths = shard_paths(dataset_uri, split)
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
        labels = split_dataset(dataset_uri, split).to_table(columns=["label"]).column("label").slice(0, rows)
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

"""The dataset format: what `train-food ingest` writes and what training, evaluation and serving read.

A dataset is a folder (or pyarrow.fs URI) holding `manifest.json` and Parquet shards per split.
The manifest names the classes (index = label), the rows per split and class, the shards of each
split (readers read exactly those: see `shard_paths`), the build's fingerprint and the digest of
the test split's rows. This module is the one place that spells out that contract: ingestion
writes `SCHEMA` and the manifest keys below, and every reader goes through `read_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import pyarrow as pa
import pyarrow.fs as pafs

from ray_jobs.errors import UserInputError
from ray_jobs.storage import filesystem

if TYPE_CHECKING:
    import pyarrow.dataset as pads

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
FORMAT = "train-food-dataset"  # manifest["format"]: marks a folder as ours
SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

SCHEMA = pa.schema([
    pa.field("image", pa.binary()),  # encoded image bytes (JPEG, PNG, ... as stored)
    pa.field("label", pa.int32()),  # index into manifest["classes"]
    pa.field("class_name", pa.string()),
    pa.field("split", pa.string()),
    pa.field("sha256", pa.string()),  # of the source file's bytes
    pa.field("width", pa.int32()),  # of the stored image
    pa.field("height", pa.int32()),
    pa.field("source_path", pa.string()),  # POSIX, relative to SRC
])


def read_manifest(dataset_uri: str, fs: pafs.FileSystem | None = None, root: str | None = None) -> dict[str, Any]:
    """`manifest.json` of a dataset, or one `UserInputError` line saying why there is none to read.

    `fs` and `root` skip resolving `dataset_uri` again when the caller already has them.
    """
    if fs is None or root is None:
        fs, root = filesystem(dataset_uri)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{MANIFEST_FILE}") as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        raise UserInputError(f"dataset {dataset_uri} has no {MANIFEST_FILE}: run `train-food ingest` first") from None
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise UserInputError(f"dataset {dataset_uri}: cannot read {MANIFEST_FILE}: {err}") from None
    if not isinstance(manifest, dict):
        raise UserInputError(f"dataset {dataset_uri}: {MANIFEST_FILE} holds a {type(manifest).__name__}, not a manifest")
    return manifest


def is_ingested(manifest: dict[str, Any]) -> bool:
    """Written by `train-food ingest` (ingestion replaces only folders that are)."""
    return manifest.get("format") == FORMAT


def shard_paths(dataset_uri: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The split's shards as the manifest lists them: files it does not list are never read.

    Publishing to an object store puts the new shards next to the old ones before the new
    manifest replaces the old one (see `tasks.ingest.store`), so listing the split folder could
    mix two builds; the manifest names exactly one.
    """
    fs, root = filesystem(dataset_uri)
    shards = read_manifest(dataset_uri, fs, root).get("shards", {}).get(split)
    if not shards:
        raise UserInputError(f"dataset {dataset_uri!r} has no {split!r} split in its manifest")
    if any(not isinstance(s, str) or s.startswith("/") or ".." in s.split("/") for s in shards):
        raise UserInputError(f"dataset {dataset_uri!r}: manifest lists shards outside the dataset folder")
    return fs, [f"{root.rstrip('/')}/{shard}" for shard in shards]


def split_dataset(dataset_uri: str, split: str) -> pads.Dataset:
    """The split's shards as one pyarrow dataset (nothing read yet)."""
    import pyarrow.dataset as pads  # here: it imports pandas, which `train-food ingest` never needs
    fs, paths = shard_paths(dataset_uri, split)
    return pads.dataset(paths, format="parquet", filesystem=fs)


def rows_digest(rows: Iterable[tuple[str, int]], classes: list[str]) -> str:
    """sha256 naming a split's content: the class list and every row's (sha256 of stored image, label).

    Order-free, so it depends on what the split holds, not on how ingestion ordered or sharded it,
    nor on the ingest code's version: equal digests mean the same photos with the same labels.
    """
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    for image_sha256, label in sorted(rows):
        digest.update(f"\n{image_sha256}\0{label}".encode())
    return digest.hexdigest()


def digest_of_test_split(dataset_uri: str, manifest: dict[str, Any]) -> str:
    """The manifest's `test_split_digest`; computed from the shards for datasets ingested before it was recorded."""
    recorded = manifest.get("test_split_digest")
    if isinstance(recorded, str) and recorded:
        return recorded
    table = split_dataset(dataset_uri, "test").to_table(columns=["image", "label"])
    rows = ((hashlib.sha256(image).hexdigest(), int(label))
            for image, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True))
    return rows_digest(rows, list(manifest.get("classes", [])))


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
    manifest = read_manifest(dataset_uri)
    classes = manifest.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise UserInputError(f"dataset {dataset_uri!r}: manifest lists {classes!r} as classes; need at least 2")
    counts = manifest.get("counts", {})
    for split in required_splits:
        expected = sum((counts.get(split) or {}).values())
        if expected == 0:
            raise UserInputError(f"dataset {dataset_uri!r}: manifest has no rows in split {split!r}")
        shards = split_dataset(dataset_uri, split)
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

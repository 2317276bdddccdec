"""The output side of ingestion: Parquet shards, the manifest, and the atomic publish.

All I/O goes through `pyarrow.fs`, so the output can be a local folder or any URI pyarrow
understands (`s3://bucket/prefix`, `gs://...`, `hdfs://...`). A dataset is first written to a
`DIR.tmp-<uuid>` sibling and only then published to DIR, so readers never see half a dataset, and
a previous dataset at DIR stays whole until the new one is complete (see `publish`).
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ray_jobs.dataset_format import FORMAT, MANIFEST_FILE, SCHEMA, is_ingested, read_manifest
from ray_jobs.errors import UserInputError
from ray_jobs.storage import is_uri
from tasks.ingest.files import read_regular

# Folders ingestion makes next to or inside DIR: `DIR.tmp-<hex>` (being written), `DIR.old-<hex>`
# (the previous dataset while a local swap runs) and `DIR/gen-<hex>` (shards published to an object store).
_TEMP_NAME = re.compile(r".+\.(tmp|old)-[0-9a-f]{32}")
_GENERATION_NAME = re.compile(r"gen-[0-9a-f]{32}")

ROW_GROUP_BYTES = 8 * 2**20
log = logging.getLogger(__name__)


def open_output(uri: str) -> tuple[pafs.FileSystem, str]:
    """File system and path for an output URI; plain paths are made absolute first."""
    if not is_uri(uri):
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:
        raise UserInputError(f"cannot open output {uri}: {err}") from None


def read_ingested_manifest(dataset_uri: str | os.PathLike[str], fs: pafs.FileSystem | None = None,
                           path: str | None = None) -> dict[str, Any]:
    """The manifest of a dataset written by `ingest` (`UserInputError` if the folder is not one).

    Reads through `ray_jobs.dataset_format.read_manifest`, on the output's file system.
    """
    uri = os.fspath(dataset_uri)
    if fs is None or path is None:
        fs, path = open_output(uri)
    manifest = read_manifest(uri, fs, path)
    if not is_ingested(manifest):
        raise UserInputError(f"{uri} is not a train-food dataset ({MANIFEST_FILE} lacks format={FORMAT!r})")
    return manifest


def existing_dataset(fs: pafs.FileSystem, path: str, uri: str) -> dict[str, Any] | None:
    """Manifest of the dataset already at the output, None if the output is absent or empty.

    Raises `UserInputError` for anything else there, so ingestion never overwrites foreign data.
    Shards left by an interrupted first publish to an object store (`gen-<hex>/` folders and no
    manifest) count as empty: they are ours, and the next publish deletes them.
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise UserInputError(f"output {uri} exists and is not a folder")
    entries = fs.get_file_info(pafs.FileSelector(path))
    if all(entry.type == pafs.FileType.Directory and _GENERATION_NAME.fullmatch(entry.base_name)
           for entry in entries):
        return None
    try:
        return read_ingested_manifest(uri, fs, path)
    except UserInputError as err:
        raise UserInputError(f"output {uri} exists, is not empty and is not a train-food dataset "
                             f"({err}); choose another --out or remove it") from None


def output_folder_reason(folder: Path) -> str | None:
    """Why a local folder is an ingest output rather than photos (None: it is not one).

    Ingesting SRC into a DIR inside SRC must not make DIR (or its temporary siblings) a class on
    the next run, nor change SRC's fingerprint.
    """
    if _TEMP_NAME.fullmatch(folder.name):
        return "temporary folder of an ingest (interrupted or still running), not photos"
    try:
        head = read_regular(folder / MANIFEST_FILE, 2**20)[:4096]
    except Exception:  # noqa: BLE001 - no readable manifest: an ordinary folder
        return None
    return "a train-food dataset (an ingest output), not photos" if f'"format": "{FORMAT}"'.encode() in head else None


def leftovers(fs: pafs.FileSystem, dest: str) -> list[str]:
    """Temporary siblings of a local DIR that an interrupted ingest left behind (none are listed
    for object stores, where listing the parent could mean listing a whole bucket)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return []
    parent, name = os.path.split(dest.rstrip("/"))
    try:
        siblings = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, s) for s in siblings
                  if s.startswith(f"{name}.") and _TEMP_NAME.fullmatch(s))


@contextmanager
def output_lock(fs: pafs.FileSystem, dest: str) -> Iterator[bool]:
    """Hold an exclusive lock on a local DIR for the whole ingest, so two ingests of it run one after
    the other (the second then finds the first's dataset); yields whether it had to wait. The lock
    is an flock on a file in the system temp folder named by DIR's path (nothing lands next to DIR;
    it is released by the kernel when a holder dies). Object stores get no lock."""
    if not isinstance(fs, pafs.LocalFileSystem):
        yield False
        return
    folder = Path(tempfile.gettempdir()) / "train-food-ingest-locks"
    folder.mkdir(exist_ok=True)
    key = hashlib.sha256(os.path.abspath(dest).encode()).hexdigest()[:32]
    with open(folder / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            log.info("ingest: waiting for another ingest of %s to finish", dest)
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clean_leftovers(fs: pafs.FileSystem, dest: str) -> list[str]:
    """Remove what killed ingests of DIR left next to it (call under `output_lock`: then none is
    running): `DIR.tmp-*` folders are deleted; a `DIR.old-*` (a swap killed between its renames)
    becomes DIR again when DIR is missing, else is deleted. Returns what was cleaned."""
    cleaned = []
    for path in leftovers(fs, dest):
        if ".old-" in os.path.basename(path) and not os.path.exists(dest):
            os.rename(path, dest)
        else:
            shutil.rmtree(path, ignore_errors=True)
        cleaned.append(path)
    return cleaned


def write_shard(fs: pafs.FileSystem, path: str, rows: list[dict[str, Any]]) -> None:
    """Write one Parquet file, in row groups of about `ROW_GROUP_BYTES` of images.

    A row group is what the training reader loads and caches at once (`ray_jobs.data`), so small
    groups keep its memory small; 8 MiB is still large enough for sequential reads.

    Built column by column from buffers (`_column`). Image bytes are already compressed, so they get
    neither compression nor a dictionary.
    """
    table = pa.Table.from_arrays([_column([row[field.name] for row in rows], field.type) for field in SCHEMA],
                                 schema=SCHEMA)
    codecs = {name: ("none" if name == "image" else "snappy") for name in SCHEMA.names}
    image_bytes = sum(len(row["image"]) for row in rows)
    group_rows = max(1, len(rows) * ROW_GROUP_BYTES // max(image_bytes, 1))
    pq.write_table(table, path, filesystem=fs, compression=codecs, use_dictionary=["class_name", "split"],
                   row_group_size=group_rows)


_MAX_OFFSET = 2**31 - 1  # int32 offsets of binary and string columns


def _column(values: list[Any], type_: pa.DataType) -> pa.Array:
    """One column from raw buffers: `pa.array` on a Python list first imports pandas (0.2 s of every
    `train-food ingest`, whose columns hold only ints, bytes and UTF-8 strings). Anything else, or
    a column past int32 offsets, goes through `pa.array`."""
    if pa.types.is_int32(type_):
        return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(array.array("i", values))])
    if not (pa.types.is_binary(type_) or pa.types.is_string(type_)):
        return pa.array(values, type=type_)
    try:
        encoded = [value.encode("utf-8") if isinstance(value, str) else value for value in values]
    except UnicodeEncodeError:
        return pa.array(values, type=type_)  # it raises, naming the value
    offsets = array.array("i", [0])
    for item in encoded:
        if offsets[-1] + len(item) > _MAX_OFFSET:
            return pa.array(values, type=type_)
        offsets.append(offsets[-1] + len(item))
    column = pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])
    column.validate(full=pa.types.is_string(type_))
    return column


class ShardWriter:
    """Buffers the rows of one split and writes `part-NNNNN.parquet` files of bounded size."""

    def __init__(self, fs: pafs.FileSystem, root: str, split: str, max_rows: int, max_bytes: int):
        self.fs, self.root, self.split = fs, root, split
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.rows: list[dict[str, Any]] = []
        self.buffered_bytes = 0
        self.written: list[str] = []  # shard paths relative to the dataset root
        fs.create_dir(f"{root}/{split}", recursive=True)

    def add(self, row: dict[str, Any]) -> None:
        """Add a row, first flushing the current shard if this row would overflow it."""
        if self.rows and self.buffered_bytes + len(row["image"]) > self.max_bytes:
            self._flush()
        self.rows.append(row)
        self.buffered_bytes += len(row["image"])
        if len(self.rows) >= self.max_rows:
            self._flush()

    def close(self) -> list[str]:
        """Write what is left (an empty shard for an empty split, so every split has a schema)."""
        if self.rows or not self.written:
            self._flush()
        return self.written

    def _flush(self) -> None:
        relative = f"{self.split}/part-{len(self.written):05d}.parquet"
        write_shard(self.fs, f"{self.root}/{relative}", self.rows)
        self.written.append(relative)
        self.rows, self.buffered_bytes = [], 0


def write_manifest(fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> None:
    with fs.open_output_stream(f"{root}/{MANIFEST_FILE}") as stream:
        stream.write(json.dumps(manifest, indent=2, sort_keys=False).encode())


def make_temp_dir(fs: pafs.FileSystem, dest: str) -> str:
    """Create the `DIR.tmp-<uuid>` sibling the dataset is built in (same file system as DIR)."""
    tmp = f"{dest.rstrip('/')}.tmp-{uuid.uuid4().hex}"
    fs.create_dir(tmp, recursive=True)
    return tmp


def remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Best-effort delete of a temp folder (used while another error is propagating)."""
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


def publish(fs: pafs.FileSystem, tmp: str, dest: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Move the finished dataset from tmp to dest, replacing an older dataset there only once the
    new one is complete. Returns the manifest as published (its shard paths may change)."""
    if isinstance(fs, pafs.LocalFileSystem):
        _swap_local(tmp, dest)
        return manifest
    return _publish_by_copy(fs, tmp, dest, manifest)


def _swap_local(tmp: str, dest: str) -> None:
    """Directory renames are atomic on a local file system; an old dataset is moved aside first
    and restored if the final rename fails. (Killed between the two renames, the old dataset
    stays whole in `DIR.old-<hex>`, and the next ingest puts it back: `clean_leftovers`.)"""
    if os.path.isdir(dest) and not os.listdir(dest):
        os.rmdir(dest)
    if not os.path.exists(dest):
        os.rename(tmp, dest)
        return
    backup = f"{dest}.old-{uuid.uuid4().hex}"
    os.rename(dest, backup)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(backup, dest)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _publish_by_copy(fs: pafs.FileSystem, tmp: str, dest: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Object stores cannot rename folders, so the new dataset goes in beside the old one:

    1. the new shards move to `dest/gen-<hex>/`, names no older manifest lists;
    2. the new manifest, listing them, replaces the old one in a single write: readers (which read
       only the shards their manifest lists) switch from the whole old dataset to the whole new one;
    3. only then is everything the new manifest does not list deleted (the old shards, and shards
       of publishes that were interrupted before step 2).
    A failure before step 2 leaves the old dataset untouched.
    """
    generation = f"gen-{uuid.uuid4().hex}"
    for rel in (rel for shards in manifest["shards"].values() for rel in shards):
        target = f"{dest}/{generation}/{rel}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.move(f"{tmp}/{rel}", target)
    published = {**manifest, "shards": {split: [f"{generation}/{rel}" for rel in shards]
                                         for split, shards in manifest["shards"].items()}}
    write_manifest(fs, dest, published)
    for entry in fs.get_file_info(pafs.FileSelector(dest)):
        if entry.base_name not in (MANIFEST_FILE, generation):
            if entry.type == pafs.FileType.Directory:
                fs.delete_dir(entry.path)
            else:
                fs.delete_file(entry.path)
    remove_quietly(fs, tmp)
    return published


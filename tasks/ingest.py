"""Ingestion: validate an ImageFolder tree once and store it as Parquet shards plus a manifest.

Training reads images many times; decoding and checking every file once, up front, means a
corrupt JPEG is found here (and listed) instead of crashing epoch 7 on a cluster. The steps:

1. scan   - list SRC without following links, detect the layout (flat or pre-split) and the
            classes; links, special files, oversized files and odd names are quarantined (`ingest_scan`)
2. hash   - fingerprint the build: every file's bytes, every folder, the options, the code version
3. skip?  - if DIR holds this build (same fingerprint), stop; if it holds another build, refuse
4. decode - fully decode every file in a process pool; bad files go to quarantine, files training's
            decoder could not read as they are are re-encoded (`ingest_decode`)
5. plan   - drop exact duplicates, carve missing splits, shuffle each split (`ingest_plan`)
6. write  - Parquet shards + manifest.json in a temp dir, then publish atomically (`ingest_store`)

Every entry listed is accounted for: files seen = rows written + quarantined + duplicates dropped.

A dataset is immutable: `ingest` never replaces a dataset of another build (other source
content, options or ingest code), and `--force` only rebuilds the same one.

Pure Python: no prefect import here (a Prefect task wraps `ingest` elsewhere).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from hashlib import sha256
from pathlib import Path
from typing import Any

from PIL import __version__ as PILLOW_VERSION
from pyarrow.fs import FileSystem
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from ray_jobs.errors import UserInputError, invalid_options
from ray_jobs.image_prep import MAX_FILE_BYTES
from tasks import ingest_store as store
from tasks.ingest_decode import Inspected, inspect_image
from tasks.ingest_files import FileTooLarge, printable, read_regular
from tasks.ingest_plan import SplitPlan, drop_duplicates, plan_splits, small_classes
from tasks.ingest_scan import SPLITS, SourceTree, fingerprint, hash_files, scan_source

log = logging.getLogger(__name__)

__all__ = ["IngestConfig", "IngestResult", "ingest", "ingest_code_version", "parse_config", "read_manifest",
           "source_fingerprint"]


class IngestConfig(BaseModel):
    """Everything `ingest` needs. Defaults live here only (the CLI passes just what the user set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    src: Path = Field(description="ImageFolder tree: SRC/<class>/<img> or SRC/<split>/<class>/<img>.")
    out: str = Field(description="Output folder or pyarrow.fs URI (s3://bucket/prefix).")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of each class carved into val.")
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of each class carved into test.")
    seed: int = Field(default=0, description="Seeds the split and the row shuffle.")
    max_side: int | None = Field(default=None, ge=1, description="Re-encode images whose longest side is larger.")
    max_file_bytes: int = Field(default=MAX_FILE_BYTES, ge=1,
                                description="Quarantine larger files unread (a stray video, a disk image).")
    shard_rows: int = Field(default=2048, ge=1, description="At most this many rows per Parquet file.")
    shard_bytes: int = Field(default=64 * 2**20, ge=1, description="About this many image bytes per Parquet file.")
    workers: int | None = Field(default=None, ge=1, description="Decode processes; None = os.cpu_count().")
    force: bool = Field(default=False, description="Rebuild even when DIR already holds this build "
                        "(never replaces another build).")
    expected_fingerprint: str | None = Field(
        default=None, description="Refuse to write unless SRC still has this fingerprint (the flow names DIR by it).")

    @field_validator("out", mode="before")
    @classmethod
    def _path_to_str(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> IngestConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 "
                             f"(got {self.val_fraction} + {self.test_fraction})")
        return self

    def options(self) -> dict[str, Any]:
        """The options that change the output (fingerprinted and stored in the manifest)."""
        return self.model_dump(include={"val_fraction", "test_fraction", "seed", "max_side", "max_file_bytes",
                                        "shard_rows", "shard_bytes"})


def parse_config(options: Mapping[str, Any]) -> IngestConfig:
    """Build an `IngestConfig` from user options; a bad value becomes a one-line `UserInputError`
    naming the option as typed on the command line (--val-fraction, not val_fraction)."""
    try:
        return IngestConfig(**options)
    except ValidationError as err:
        raise invalid_options(err) from None


@dataclass(frozen=True)
class IngestResult:
    """Where the dataset is, its manifest, whether this run skipped all work, and temporary folders
    that interrupted runs left next to a local DIR."""

    out: str
    manifest: dict[str, Any]
    skipped: bool
    leftovers: tuple[str, ...] = ()

    def summary(self) -> str:
        """A few human-readable lines: the file accounting, split sizes and warnings."""
        m = self.manifest
        lines = [f"ingest: {m['files_seen']} files seen = {m['rows_written']} rows written"
                 f" + {m['quarantined']} quarantined + {m['duplicates_dropped']} duplicates dropped"]
        if self.skipped:
            lines.insert(0, f"ingest: {self.out} is up to date (fingerprint {m['fingerprint'][:12]}), "
                            "nothing to do; use --force to rebuild")
        sizes = ", ".join(f"{split} {sum(m['counts'][split].values())}" for split in SPLITS)
        carved = "".join(f"; {split} carved from {src}" for split, src in m["splits_carved"].items())
        lines.append(f"  {len(m['classes'])} classes; rows: {sizes}{carved}")
        if m.get("reencoded"):
            reasons = ", ".join(f"{count} {reason}" for reason, count in m["reencoded"].items())
            lines.append(f"  re-encoded for the training decoder: {reasons}")
        if m.get("links_not_followed"):
            lines.append(f"  {m['links_not_followed']} symbolic link(s) not followed (quarantined: see manifest.json)")
        for item in m.get("skipped_folders", []):
            lines.append(f"  skipped folder {item['path']}: {item['reason']}")
        for item in m["small_classes"]:
            lines.append(f"  warning: class {item['class_name']!r} ({item['images']} images) "
                         f"is missing from {', '.join(item['missing_from'])}")
        for path in self.leftovers:
            lines.append(f"  warning: {path} was left by an interrupted ingest; delete it once no ingest is running")
        lines.append(f"  dataset: {self.out}")
        return "\n".join(lines)


def _read_code_version() -> str:
    """sha256 of the ingest code as loaded: the tasks/ingest*.py sources, ray_jobs/image_prep.py (what
    is stored as it is and how the rest is converted), the dataset schema version and the Pillow
    version (it decodes and re-encodes images)."""
    digest = sha256(f"schema {store.SCHEMA_VERSION}; pillow {PILLOW_VERSION}".encode())
    here = Path(__file__).parent
    ingest_modules = sorted(here.glob("ingest*.py"))
    if not ingest_modules:
        raise RuntimeError(f"cannot find the ingest sources next to {__file__}")
    for path in [*ingest_modules, here.parent / "ray_jobs" / "image_prep.py"]:
        digest.update(f"\n{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


_CODE_VERSION = _read_code_version()  # read once, at import: the code this process runs


def ingest_code_version() -> str:
    """Identifies the ingest code; part of every fingerprint, so changed code makes a new build."""
    return _CODE_VERSION


@dataclass(frozen=True)
class _SourceHash:
    fingerprint: str
    digests: dict[str, str]  # relative path -> sha256 of its bytes (UNREADABLE if it could not be read)


def _hash_source(tree: SourceTree, options: Mapping[str, object]) -> _SourceHash:
    digests = hash_files(tree)
    return _SourceHash(fingerprint(digests, tree.dirs, options, ingest_code_version()), digests)


def source_fingerprint(src: str | os.PathLike[str], options: Mapping[str, object]) -> str:
    """The fingerprint of the build `ingest` would make from SRC with these options (64 hex).

    sha256 over every file's relative path and the sha256 of its bytes, every folder (an empty
    class folder counts), the options and `ingest_code_version()`. Reads every file it could ingest
    (in chunks). Equal fingerprints mean equal datasets, so it names the dataset folder in the flow.
    """
    return _hash_source(scan_source(src, int(options["max_file_bytes"])), options).fingerprint


def short_fingerprint(fingerprint: str | None) -> str:
    """The first 16 hex digits: enough to tell builds apart in a folder name or a message."""
    return (fingerprint or "none")[:16]


def read_manifest(dataset_uri: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a dataset written by `ingest`; `UserInputError` if DIR is not one."""
    uri = os.fspath(dataset_uri)
    fs, path = store.open_output(uri)
    return store.load_manifest(fs, path, uri)


def ingest(cfg: IngestConfig) -> IngestResult:
    """Validate SRC and write it as a Parquet dataset at cfg.out (or skip if DIR already holds this build).

    Raises `UserInputError` if DIR holds another build, or if SRC changes while it is read.
    """
    tree = scan_source(cfg.src, cfg.max_file_bytes)
    source = _hash_source(tree, cfg.options())
    expected = cfg.expected_fingerprint
    if expected is not None and source.fingerprint != expected:
        raise UserInputError(f"source folder {printable(str(tree.root))} changed after it was fingerprinted "
                             f"({short_fingerprint(expected)} then, {short_fingerprint(source.fingerprint)} now: "
                             "a file was added, removed or rewritten); run again once the source is stable")
    fs, dest = store.open_output(cfg.out)
    existing = _existing_build(fs, dest, cfg.out, source.fingerprint)
    if existing is not None and not cfg.force:
        log.info("ingest: %s is up to date, skipping", cfg.out)
        return IngestResult(cfg.out, existing, skipped=True, leftovers=tuple(store.leftovers(fs, dest)))
    if existing is not None:
        log.info("ingest: --force: rebuilding %s (same build, fingerprint %s)", cfg.out,
                 short_fingerprint(source.fingerprint))
    with tempfile.TemporaryDirectory(prefix="train-food-ingest-") as spool:
        images, quarantine = _decode_all(tree, cfg, spool, source.digests)
        kept, duplicates = drop_duplicates(images)
        _require_two_classes(kept, tree)
        plan = plan_splits(kept, set(tree.split_dirs), cfg.val_fraction, cfg.test_fraction, cfg.seed)
        manifest = _manifest(tree, cfg, source.fingerprint, plan, quarantine, duplicates)
        manifest = _write_dataset(fs, dest, cfg.out, plan, tree, cfg, manifest)
    _log_warnings(manifest)
    return IngestResult(cfg.out, manifest, skipped=False, leftovers=tuple(store.leftovers(fs, dest)))


def _existing_build(fs: FileSystem, dest: str, uri: str, source_hash: str) -> dict[str, Any] | None:
    """The manifest at the output when it holds this build; None when the output is absent or empty.

    Raises `UserInputError` when it holds another build: a dataset is never replaced by a
    different one (a checkpoint trained on it would be evaluated on other splits).
    """
    existing = store.existing_dataset(fs, dest, uri)
    if existing is None or existing.get("fingerprint") == source_hash:
        return existing
    raise UserInputError(f"output {uri} holds another dataset build (fingerprint "
                         f"{short_fingerprint(existing.get('fingerprint'))}, this build is "
                         f"{short_fingerprint(source_hash)}); datasets are never overwritten: "
                         f"choose another --out or remove {uri} yourself")


@dataclass(frozen=True)
class _Image:
    """A file that decoded fine: where it came from and what will be stored."""

    rel_path: str
    class_name: str
    source_split: str | None
    sha256: str  # of the source file
    content_sha256: str  # of the bytes stored
    width: int
    height: int
    reencoded_path: str | None
    reencode_reason: str | None


def _decode_all(tree: SourceTree, cfg: IngestConfig, spool: str,
                digests: Mapping[str, str]) -> tuple[list[_Image], list[dict[str, str]]]:
    """Decode every candidate file; return the good images and the quarantine list.

    `digests` holds each file's sha256 as fingerprinted: a file whose bytes differ now fails the
    ingest (the manifest's fingerprint would not describe what was written).
    """
    quarantine = [{"path": f.rel_path, "reason": f.problem} for f in tree.files if f.problem]
    candidates = [f for f in tree.files if not f.problem]
    jobs = [(i, str(tree.root / f.rel_path)) for i, f in enumerate(candidates)]
    decode = partial(inspect_image, max_side=cfg.max_side, spool_dir=spool, max_file_bytes=cfg.max_file_bytes)
    images = []
    results = _map_with_progress(decode, jobs, cfg.workers)
    for file, found in zip(candidates, results, strict=True):
        if found.sha256 != digests[file.rel_path]:
            raise UserInputError(f"{printable(str(tree.root / file.rel_path))} changed while it was being ingested "
                                 "(its bytes differ from when the source was fingerprinted); run again once the "
                                 "source is stable")
        if found.error:
            quarantine.append({"path": file.rel_path, "reason": found.error})
        else:
            images.append(_Image(file.rel_path, file.class_name, file.source_split, found.sha256,
                                 found.content_sha256, found.width, found.height, found.reencoded_path,
                                 found.reencode_reason))
    shown = [{"path": printable(q["path"]), "reason": q["reason"]} for q in quarantine]
    return images, sorted(shown, key=lambda q: q["path"])


def _map_with_progress(fn: Callable[[tuple[int, str]], Inspected], jobs: list[tuple[int, str]],
                       workers: int | None) -> list[Inspected]:
    """Run fn over jobs (in order) in `workers` processes, with a progress bar on stderr."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results = []
    with tqdm(total=len(jobs), desc="ingest: decoding", unit="img", file=sys.stderr) as bar:
        for result in _parallel_map(fn, jobs, workers):
            results.append(result)
            bar.update()
    return results


def _parallel_map(fn: Callable[[tuple[int, str]], Inspected], jobs: list[tuple[int, str]],
                  workers: int) -> Iterator[Inspected]:
    if workers == 1:  # no pool: cheaper for tiny inputs and easy to debug
        yield from map(fn, jobs)
        return
    # "spawn": a fresh interpreter that imports only tasks.ingest_decode (no forked prefect/torch state).
    context = multiprocessing.get_context("spawn")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield from pool.map(fn, jobs, chunksize=chunk)
    finally:  # on Ctrl-C or an error, drop the queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)


def _require_two_classes(images: Iterable[_Image], tree: SourceTree) -> None:
    found = sorted({image.class_name for image in images})
    if len(found) < 2:
        raise UserInputError(f"source folder {tree.root}: only {len(found)} class(es) have readable images "
                             f"({', '.join(found) or 'none'}); a classifier needs at least two")


def _manifest(tree: SourceTree, cfg: IngestConfig, source_hash: str, plan: SplitPlan,
              quarantine: list[dict[str, str]], duplicates: list[dict[str, str]]) -> dict[str, Any]:
    """Everything a reader (or a person) needs to trust and use the dataset."""
    counts = {split: {c: 0 for c in tree.classes} for split in SPLITS}
    for split, rows in plan.rows.items():
        for image in rows:
            counts[split][image.class_name] += 1
    rows_written = sum(len(rows) for rows in plan.rows.values())
    _check_accounting(len(tree.files), rows_written, len(quarantine), len(duplicates))
    reencoded = Counter(image.reencode_reason for rows in plan.rows.values() for image in rows
                        if image.reencode_reason)
    return {
        "format": store.FORMAT,
        "schema_version": store.SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": printable(str(tree.root)),
        "layout": tree.layout,
        "source_split_folders": tree.split_dirs,
        "classes": list(tree.classes),
        "counts": counts,
        "options": cfg.options(),
        "fingerprint": source_hash,
        "ingest_code_version": ingest_code_version(),
        "splits_carved": plan.carved,
        "small_classes": small_classes(plan.rows, tree.classes),
        "quarantine": quarantine,
        "duplicates": duplicates,
        "reencoded": dict(sorted(reencoded.items())),
        "links_not_followed": sum(file.kind == "link" for file in tree.files),
        "skipped_folders": list(tree.skipped_folders),
        "files_seen": len(tree.files),
        "rows_written": rows_written,
        "quarantined": len(quarantine),
        "duplicates_dropped": len(duplicates),
    }


def _check_accounting(seen: int, written: int, quarantined: int, duplicates: int) -> None:
    """Every file is a row, a quarantine entry or a dropped duplicate: none may vanish."""
    if seen != written + quarantined + duplicates:
        raise RuntimeError(f"ingest bug: {seen} files seen != {written} rows + {quarantined} "
                           f"quarantined + {duplicates} duplicates")


def _write_dataset(fs: FileSystem, dest: str, uri: str, plan: SplitPlan, tree: SourceTree, cfg: IngestConfig,
                   manifest: dict[str, Any]) -> dict[str, Any]:
    """Write all shards and the manifest into a temp sibling of dest, then publish it.

    On any failure (Ctrl-C included) the temp dir is removed and dest is left as it was.
    Returns the manifest as written (with the shard list).
    """
    tmp = store.make_temp_dir(fs, dest)
    try:
        shards = {split: _write_split(fs, tmp, split, plan.rows[split], tree, cfg) for split in SPLITS}
        manifest = {**manifest, "shards": shards}
        store.write_manifest(fs, tmp, manifest)
        _existing_build(fs, dest, uri, manifest["fingerprint"])  # another build may have landed meanwhile
        manifest = store.publish(fs, tmp, dest, manifest)
    except BaseException:
        store.remove_quietly(fs, tmp)
        raise
    return manifest


def _write_split(fs: FileSystem, root: str, split: str, images: list[_Image], tree: SourceTree,
                 cfg: IngestConfig) -> list[str]:
    labels = {name: i for i, name in enumerate(tree.classes)}
    writer = store.ShardWriter(fs, root, split, cfg.shard_rows, cfg.shard_bytes)
    for image in images:
        writer.add(_row(image, split, labels[image.class_name], tree.root, cfg.max_file_bytes))
    return writer.close()


def _row(image: _Image, split: str, label: int, root: Path, max_file_bytes: int) -> dict[str, Any]:
    return {
        "image": _stored_bytes(image, root, max_file_bytes),
        "label": label,
        "class_name": image.class_name,
        "split": split,
        "sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "source_path": image.rel_path,
    }


def _stored_bytes(image: _Image, root: Path, max_file_bytes: int) -> bytes:
    """The re-encoded image if there is one, else the source bytes (checked against the hash)."""
    if image.reencoded_path:
        return Path(image.reencoded_path).read_bytes()
    try:
        data = read_regular(root / image.rel_path, max_file_bytes)
    except (FileTooLarge, OSError):
        data = b""
    if sha256(data).hexdigest() != image.sha256:
        raise UserInputError(f"{printable(str(root / image.rel_path))} changed while it was being ingested; run again")
    return data


def _log_warnings(manifest: dict[str, Any]) -> None:
    for item in manifest["small_classes"]:
        log.warning("ingest: class %r has only %d usable images and is missing from %s",
                    item["class_name"], item["images"], ", ".join(item["missing_from"]))
    if manifest["quarantined"]:
        log.warning("ingest: %d file(s) quarantined (see manifest.json 'quarantine')", manifest["quarantined"])

"""Ingestion: validate an ImageFolder tree once and store it as Parquet shards plus a manifest.

Training reads images many times; decoding and checking every file once, up front, means a
corrupt JPEG is found here (and listed) instead of crashing epoch 7 on a cluster. The steps:

1. scan   - list SRC without following links, detect the layout (flat or pre-split) and the
            classes; links, special files, oversized files and odd names are quarantined (`scan`)
2. hash   - fingerprint the build: every file's bytes, every folder, the options, the code version
            (`fingerprint`)
3. skip?  - if DIR holds this build (same fingerprint), stop; if it holds another build, refuse
4. decode - fully decode every file in a process pool; bad files go to quarantine, files training's
            decoder could not read as they are are re-encoded (`decode`)
5. plan   - drop exact duplicates, carve missing splits, shuffle each split (`plan`)
6. write  - Parquet shards + manifest.json in a temp dir, then publish atomically (`store`)

Every entry listed is accounted for: files seen = rows written + quarantined + duplicates dropped.

A dataset is immutable: `ingest` never replaces a dataset of another build (other source
content, options or ingest code), and `--force` only rebuilds the same one.

Pure Python: no prefect import here (a Prefect task wraps `ingest` elsewhere).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from hashlib import sha256
from pathlib import Path
from typing import Any

from pyarrow.fs import FileSystem
from tqdm import tqdm

from ray_jobs.dataset_format import FORMAT, SCHEMA_VERSION, SPLITS, rows_digest
from ray_jobs.errors import UserInputError
from tasks.ingest import store
from tasks.ingest.config import IngestConfig, IngestResult
from tasks.ingest.decode import Inspected, inspect_image
from tasks.ingest.files import FileTooLarge, printable, read_regular
from tasks.ingest.fingerprint import SourceHash, hash_source, short_fingerprint
from tasks.ingest.plan import SplitPlan, drop_duplicates, plan_splits, small_classes
from tasks.ingest.scan import SourceTree, scan_source
from tasks.ingest.workers import ResourceExhausted, supervised_map

log = logging.getLogger(__name__)


def ingest(cfg: IngestConfig) -> IngestResult:
    """Validate SRC and write it as a Parquet dataset at cfg.out (or skip if DIR already holds this build).

    Raises `UserInputError` if DIR holds another build, or if SRC changes while it is read.
    """
    tree = scan_source(cfg.src, cfg.max_file_bytes)
    source = hash_source(tree, cfg.options())
    expected = cfg.expected_fingerprint
    if expected is not None and source.fingerprint != expected:
        raise UserInputError(f"source folder {printable(str(tree.root))} changed after it was fingerprinted "
                             f"({short_fingerprint(expected)} then, {short_fingerprint(source.fingerprint)} now: "
                             "a file was added, removed or rewritten); run again once the source is stable")
    fs, dest = store.open_output(cfg.out)
    with store.output_lock(fs, dest) as waited:
        cleaned = tuple(store.clean_leftovers(fs, dest))
        existing = _existing_build(fs, dest, cfg.out, source.fingerprint)
        if existing is not None and not cfg.force:
            log.info("ingest: %s is up to date, skipping", cfg.out)
            return IngestResult(cfg.out, existing, skipped=True, cleaned=cleaned, waited=waited)
        if existing is not None:
            log.info("ingest: --force: rebuilding %s (same build, fingerprint %s)", cfg.out,
                     short_fingerprint(source.fingerprint))
        with store.spool_dir() as spool:
            images, quarantine = _decode_all(tree, cfg, spool, source.digests)
            kept, duplicates = drop_duplicates(images)
            _require_two_classes(kept, tree)
            plan = plan_splits(kept, set(tree.split_dirs), cfg.val_fraction, cfg.test_fraction, cfg.seed)
            manifest = _manifest(tree, cfg, source, plan, quarantine, duplicates)
            manifest = _write_dataset(fs, dest, cfg.out, plan, tree, cfg, manifest)
    _log_warnings(manifest)
    return IngestResult(cfg.out, manifest, skipped=False, cleaned=cleaned, waited=waited)


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
    results = _map_with_progress(decode, jobs, cfg.workers, cfg.decode_timeout_s)
    for file, found in zip(candidates, results, strict=True):
        if found.sha256 and found.sha256 != digests[file.rel_path]:  # "": never read (unreadable, decoder lost)
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
                       workers: int | None, timeout_s: float) -> list[Inspected]:
    """Run fn over jobs in `workers` supervised processes (`tasks.ingest.workers`), with a progress bar on
    stderr; results in job order. Running out of memory or spool disk fails the run in one line."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: dict[tuple[int, str], Inspected] = {}
    with tqdm(total=len(jobs), desc="ingest: decoding", unit="img", file=sys.stderr) as bar:
        try:
            for job, result in supervised_map(fn, jobs, workers, timeout_s):
                results[job] = result
                bar.update()
        except ResourceExhausted as err:
            raise UserInputError(f"ingest stopped, nothing written: the machine ran out while decoding {err}; "
                                 "free memory or disk (or use fewer --workers) and run again") from None
    return [results[job] for job in jobs]


def _require_two_classes(images: Iterable[_Image], tree: SourceTree) -> None:
    found = sorted({image.class_name for image in images})
    if len(found) < 2:
        raise UserInputError(f"source folder {tree.root}: only {len(found)} class(es) have readable images "
                             f"({', '.join(found) or 'none'}); a classifier needs at least two")


def _manifest(tree: SourceTree, cfg: IngestConfig, source: SourceHash, plan: SplitPlan,
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
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": printable(str(tree.root)),
        "layout": tree.layout,
        "source_split_folders": tree.split_dirs,
        "classes": list(tree.classes),
        "counts": counts,
        "options": cfg.options(),
        "fingerprint": source.fingerprint,
        "test_split_digest": rows_digest([(image.content_sha256, tree.classes.index(image.class_name))
                                          for image in plan.rows["test"]], list(tree.classes)),
        "ingest_code_version": source.code_version,
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

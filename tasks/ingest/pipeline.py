"""Ingestion: validate an ImageFolder tree once and store it as Parquet shards plus a manifest.

Training reads images many times; decoding and checking every file once, up front, means a
corrupt JPEG is found here (and listed) instead of crashing epoch 7 on a cluster. The steps:

1. scan   - list SRC without following links, detect the layout (flat or pre-split) and the
            classes; links, special files, oversized files and odd names are quarantined (`scan`)
2. known? - if DIR's source index records every listed file with the same stamp, DIR holds this
            build: stop without reading a file (`source_index`)
3. decode - read each file once in a process pool: hash it, fully decode it, spool the bytes to
            store; bad files go to quarantine, files training's decoder could not read as they are
            are re-encoded (`decode`)
4. hash   - fingerprint the build from those hashes, every folder, the options and the code version
            (`fingerprint`); if DIR holds this build, stop; if it holds another build, refuse
5. plan   - drop exact duplicates, carve missing splits, shuffle each split (`plan`)
6. write  - Parquet shards (from the spool) + manifest.json + source index in a temp dir, then
            publish atomically (`store`)

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
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

from pyarrow.fs import FileSystem
from tqdm import tqdm

from ray_jobs.dataset_format import FORMAT, SCHEMA_VERSION, SPLITS, rows_digest
from ray_jobs.errors import UserInputError
from tasks.ingest import store
from tasks.ingest.config import IngestConfig, IngestResult
from tasks.ingest.decode import Inspected, inspect_image
from tasks.ingest import source_index
from tasks.ingest.config import FINGERPRINT_FIELD
from tasks.ingest.files import printable
from tasks.ingest import fingerprint as fingerprinting
from tasks.ingest.fingerprint import UNREADABLE, listing_digest, short_fingerprint
from tasks.ingest.plan import SplitPlan, drop_duplicates, plan_splits, small_classes
from tasks.ingest.scan import SourceTree, scan_source
from tasks.ingest.spool import Spool, spool_of_this_run
from tasks.ingest.workers import ResourceExhausted, WorkersKeepDying, supervised_map

log = logging.getLogger(__name__)


FilesDone = Callable[[int, int], None]  # (files decoded, files to decode)


def ingest(cfg: IngestConfig, on_progress: FilesDone | None = None) -> IngestResult:
    """Validate SRC and write it as a Parquet dataset at cfg.out (or skip if DIR already holds this build).

    Each file is read once, by its decode worker (hash, decode check and the bytes stored come from
    that read), so the fingerprint is known after decoding; a rerun on an unchanged source knows it
    from the dataset's source index without reading (`source_index`). `on_progress(done, total)`
    hears every decoded file. Raises `UserInputError` if DIR holds another build.
    """
    tree = scan_source(cfg.src, cfg.max_file_bytes)
    fs, template = store.open_output(cfg.out)
    if FINGERPRINT_FIELD in template:  # DIR is named by the build: it is locked once the build is known
        return _ingest(fs, cfg, tree, template, on_progress, waited=None)
    store.existing_dataset(fs, template, cfg.out)  # a DIR holding something else is refused before any read
    with store.output_lock(fs, template) as waited:  # one ingest of DIR at a time, from its first read
        return _ingest(fs, cfg, tree, template, on_progress, waited)


def _ingest(fs: FileSystem, cfg: IngestConfig, tree: SourceTree, template: str, on_progress: FilesDone | None,
            waited: bool | None) -> IngestResult:
    """Reuse the build the source index names, else read every file once and finish from what it gave."""
    options, code_version = cfg.options(), fingerprinting.ingest_code_version()
    known = None if cfg.force else source_index.known_build(fs, template, tree, options, code_version)
    if known is not None:
        reused = _finish(fs, cfg, template, known, None, tree, waited)
        if reused is not None:
            return reused
    with spool_of_this_run() as spool:
        decoded = _decode_all(tree, cfg, spool, on_progress)
        digests = {**{f.rel_path: listing_digest(f.problem) for f in tree.files if f.problem}, **decoded.digests}
        source_hash = fingerprinting.fingerprint(digests, tree.dirs, options, code_version)
        result = _finish(fs, cfg, template, source_hash, (decoded, digests), tree, waited)
    assert result is not None  # with the decoded files at hand, _finish always writes or skips
    return result


def _finish(fs: FileSystem, cfg: IngestConfig, template: str, source_hash: str,
            decoded: tuple[_Decoded, dict[str, str]] | None, tree: SourceTree,
            waited: bool | None) -> IngestResult | None:
    """Under DIR's lock (taken here unless the caller holds it: `waited` is not None): clean what killed
    runs left, then skip (DIR holds this build) or write it (None when there is nothing to write
    from: the build the index named is gone)."""
    dest, uri = source_index.named(template, source_hash), source_index.named(cfg.out, source_hash)
    with nullcontext(waited) if waited is not None else store.output_lock(fs, dest) as waited:
        cleaned = tuple(store.clean_leftovers(fs, dest))
        existing = _existing_build(fs, dest, uri, source_hash)
        if existing is not None and not cfg.force:
            log.info("ingest: %s is up to date, skipping", uri)
            return IngestResult(uri, existing, skipped=True, cleaned=cleaned, waited=waited)
        if decoded is None:  # the index named a build that is gone now: read the source after all
            return None
        if existing is not None:
            log.info("ingest: --force: rebuilding %s (same build, fingerprint %s)", uri, short_fingerprint(source_hash))
        images, digests = decoded
        kept, duplicates = drop_duplicates(images.images)
        _require_two_classes(kept, tree)
        plan = plan_splits(kept, set(tree.split_dirs), cfg.val_fraction, cfg.test_fraction, cfg.seed)
        manifest = _manifest(tree, cfg, source_hash, plan, images.quarantine, duplicates)
        index = source_index.index_document(tree, digests, cfg.options(), manifest["ingest_code_version"])
        manifest = _write_dataset(fs, dest, uri, plan, tree, cfg, manifest, index, images.spool)
    _log_warnings(manifest)
    return IngestResult(uri, manifest, skipped=False, cleaned=cleaned, waited=waited)


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
    picture_sha256: str  # of the picture in them (duplicates share it: `plan.drop_duplicates`)
    width: int
    height: int
    stored_at: tuple[str, int, int]  # (spool file, offset, length) of the bytes to store
    reencode_reason: str | None


@dataclass(frozen=True)
class _Decoded:
    """What the one read of every file gave: good images, the quarantine list, every file's hash."""

    images: list[_Image]
    quarantine: list[dict[str, str]]
    digests: dict[str, str]  # relative path -> sha256 of the bytes read (UNREADABLE if none)
    spool: Spool  # the bytes to store, each image's at its `stored_at`


def _decode_all(tree: SourceTree, cfg: IngestConfig, spool: Spool, on_progress: FilesDone | None) -> _Decoded:
    """Read and decode every candidate file once (in worker processes); the bytes to store go to `spool`."""
    quarantine = [{"path": f.rel_path, "reason": f.problem} for f in tree.files if f.problem]
    candidates = [f for f in tree.files if not f.problem]
    jobs = [(i, str(tree.root / f.rel_path)) for i, f in enumerate(candidates)]
    decode = partial(inspect_image, max_side=cfg.max_side, spool_dir=spool.folder, max_file_bytes=cfg.max_file_bytes)
    images, digests = [], {}
    results = _map_with_progress(decode, jobs, cfg.workers, cfg.decode_timeout_s, on_progress)
    for file, found in zip(candidates, results, strict=True):
        digests[file.rel_path] = found.sha256 or UNREADABLE
        if found.error:
            quarantine.append({"path": file.rel_path, "reason": found.error})
        else:
            images.append(_Image(file.rel_path, file.class_name, file.source_split, found.sha256,
                                 found.content_sha256, found.picture_sha256, found.width, found.height, found.stored_at,
                                 found.reencode_reason))
    shown = [{"path": printable(q["path"]), "reason": q["reason"]} for q in quarantine]
    return _Decoded(images, sorted(shown, key=lambda q: q["path"]), digests, spool)


def _map_with_progress(fn: Callable[[tuple[int, str]], Inspected], jobs: list[tuple[int, str]],
                       workers: int | None, timeout_s: float, on_progress: FilesDone | None) -> list[Inspected]:
    """Run fn over jobs in `workers` supervised processes (`tasks.ingest.workers`), with a progress bar on
    stderr; results in job order. Running out of memory or spool disk fails the run in one line."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: dict[tuple[int, str], Inspected] = {}
    with tqdm(total=len(jobs), desc="ingest: decoding", unit="img", file=sys.stderr, leave=False) as bar:
        try:
            for job, result in supervised_map(fn, jobs, workers, timeout_s):
                results[job] = result
                bar.update()
                if on_progress is not None:
                    on_progress(len(results), len(jobs))
        except ResourceExhausted as err:
            raise UserInputError(f"ingest stopped, nothing written: the machine ran out while decoding {err}; "
                                 "free memory or disk (or use fewer --workers) and run again") from None
        except WorkersKeepDying as err:
            raise UserInputError(f"ingest stopped, nothing written: {err} (their error output is above); "
                                 "check the installation (`make install`) and run again") from None
    return [results[job] for job in jobs]


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
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": printable(str(tree.root)),
        "layout": tree.layout,
        "source_split_folders": tree.split_dirs,
        "classes": list(tree.classes),
        "counts": counts,
        "options": cfg.options(),
        "fingerprint": source_hash,
        "test_split_digest": rows_digest([(image.content_sha256, tree.classes.index(image.class_name))
                                          for image in plan.rows["test"]], list(tree.classes)),
        "ingest_code_version": fingerprinting.ingest_code_version(),
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
                   manifest: dict[str, Any], index: bytes, spool: Spool) -> dict[str, Any]:
    """Write all shards and the manifest into a temp sibling of dest, then publish it.

    On any failure (Ctrl-C included) the temp dir is removed and dest is left as it was.
    Returns the manifest as written (with the shard list).
    """
    tmp = store.make_temp_dir(fs, dest)
    try:
        shards = {split: _write_split(fs, tmp, split, plan.rows[split], tree, cfg, spool) for split in SPLITS}
        manifest = {**manifest, "shards": shards}
        source_index.write(fs, tmp, index)
        store.write_manifest(fs, tmp, manifest)
        _existing_build(fs, dest, uri, manifest["fingerprint"])  # another build may have landed meanwhile
        manifest = store.publish(fs, tmp, dest, manifest)
    except BaseException:
        store.remove_quietly(fs, tmp)
        raise
    return manifest


def _write_split(fs: FileSystem, root: str, split: str, images: list[_Image], tree: SourceTree,
                 cfg: IngestConfig, spool: Spool) -> list[str]:
    labels = {name: i for i, name in enumerate(tree.classes)}
    writer = store.ShardWriter(fs, root, split, cfg.shard_rows, cfg.shard_bytes)
    for image in images:
        writer.add(_row(image, split, labels[image.class_name], spool))
    return writer.close()


def _row(image: _Image, split: str, label: int, spool: Spool) -> dict[str, Any]:
    return {
        "image": spool.read(*image.stored_at),  # what the one read gave (or its re-encoding)
        "label": label,
        "class_name": image.class_name,
        "split": split,
        "sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "source_path": image.rel_path,
    }


def _log_warnings(manifest: dict[str, Any]) -> None:
    for item in manifest["small_classes"]:
        log.warning("ingest: class %r has only %d usable images and is missing from %s",
                    item["class_name"], item["images"], ", ".join(item["missing_from"]))
    if manifest["quarantined"]:
        log.warning("ingest: %d file(s) quarantined (see manifest.json 'quarantine')", manifest["quarantined"])

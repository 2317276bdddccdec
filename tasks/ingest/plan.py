"""Decide which valid image goes to which split: drop exact duplicates, carve splits, shuffle.

Pure functions over in-memory records (no I/O). Every decision starts from a sort by path and
uses a `random.Random` seeded from the user's seed plus a fixed label, so the result depends
only on the files and the seed, never on the file system's listing order or on PYTHONHASHSEED.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tasks.ingest.scan import SPLITS


class _Image(Protocol):
    @property
    def rel_path(self) -> str: ...
    @property
    def class_name(self) -> str: ...
    @property
    def source_split(self) -> str | None: ...
    @property
    def content_sha256(self) -> str: ...
    @property
    def picture_sha256(self) -> str: ...


ImageT = TypeVar("ImageT", bound=_Image)


@dataclass(frozen=True)
class SplitPlan:
    """Rows per split (shuffled) and which splits were carved from which."""

    rows: dict[str, list]  # split -> images in write order
    carved: dict[str, str]  # carved split -> split it was carved from, e.g. {"val": "train"}


def drop_duplicates(images: list[ImageT]) -> tuple[list[ImageT], list[dict[str, str]]]:
    """Keep the first copy of each picture in (train, val, test, path) order.

    Dropping before splitting guarantees one picture never lands in two splits. The hash is of the
    bytes that will be stored, less a stored JPEG's metadata (`decode.jpeg_picture_digest`), so the
    same pixels in two containers (a BMP and a TIFF, both stored as the same PNG) and one JPEG with
    two EXIF blocks are duplicates too. Returns the kept images and one record per dropped copy
    naming the copy that was kept.
    """
    kept: dict[str, ImageT] = {}
    dropped = []
    for image in sorted(images, key=_dedup_order):
        first = kept.setdefault(image.picture_sha256, image)
        if first is not image:
            dropped.append({"path": image.rel_path, "kept": first.rel_path, "sha256": image.content_sha256,
                            "picture_sha256": image.picture_sha256})
    return list(kept.values()), dropped


def _dedup_order(image: _Image) -> tuple[int, str]:
    split_rank = SPLITS.index(image.source_split) if image.source_split else 0
    return split_rank, image.rel_path


def plan_splits(images: list[ImageT], source_splits: set[str], val_fraction: float,
                test_fraction: float, seed: int) -> SplitPlan:
    """Assign images to train/val/test and shuffle each split.

    Images from a source split folder stay in it. Splits the source lacks (all three for a flat
    source) are carved from the train pool, per class, at their fraction; a fraction of 0
    leaves that split empty.
    """
    fractions = {"val": val_fraction, "test": test_fraction}
    to_carve = {split: f for split, f in fractions.items() if split not in source_splits and f > 0}
    rows: dict[str, list] = {split: [] for split in SPLITS}
    for image in images:
        rows[image.source_split or "train"].append(image)
    carved_rows = carve(rows["train"], to_carve, seed)
    rows.update(carved_rows)
    shuffled = {split: shuffle(split_rows, seed, split) for split, split_rows in rows.items()}
    return SplitPlan(shuffled, {split: "train" for split in to_carve})


def carve(pool: list[ImageT], fractions: dict[str, float], seed: int) -> dict[str, list[ImageT]]:
    """Stratified split of pool: per class, `fractions[split]` of its images; the rest is train."""
    out: dict[str, list[ImageT]] = {split: [] for split in ("train", *fractions)}
    by_class: dict[str, list[ImageT]] = defaultdict(list)
    for image in pool:
        by_class[image.class_name].append(image)
    for class_name in sorted(by_class):
        members = sorted(by_class[class_name], key=lambda im: im.rel_path)
        random.Random(f"{seed}/carve/{class_name}").shuffle(members)
        start = 0
        for split, size in zip(fractions, carve_sizes(len(members), list(fractions.values()))):
            out[split].extend(members[start:start + size])
            start += size
        out["train"].extend(members[start:])
    return out


def carve_sizes(n: int, fractions: list[float]) -> list[int]:
    """How many of n images each carved split gets: round(n * f), at least 1, train keeps >= 1.

    A class too small to give every split (and train) one image gives nothing: it stays whole
    in train and is reported as a small class.
    """
    if n < len(fractions) + 1:
        return [0] * len(fractions)
    sizes = [max(1, math.floor(n * f + 0.5)) for f in fractions]
    while sum(sizes) > n - 1:
        largest = sizes.index(max(sizes))
        sizes[largest] -= 1
    return sizes


def shuffle(images: list[ImageT], seed: int, split: str) -> list[ImageT]:
    """Deterministic shuffle (sort by path, then seeded) so a streaming reader sees mixed classes."""
    ordered = sorted(images, key=lambda im: im.rel_path)
    random.Random(f"{seed}/shuffle/{split}").shuffle(ordered)
    return ordered


def small_classes(rows: dict[str, list], classes: tuple[str, ...]) -> list[dict[str, object]]:
    """Classes missing from a non-empty split (too few images), with their image count."""
    used_splits = [split for split in SPLITS if rows[split]]
    present = {split: {image.class_name for image in rows[split]} for split in used_splits}
    report = []
    for class_name in classes:
        missing = [split for split in used_splits if class_name not in present[split]]
        if missing:
            total = sum(image.class_name == class_name for split in used_splits for image in rows[split])
            report.append({"class_name": class_name, "images": total, "missing_from": missing})
    return report

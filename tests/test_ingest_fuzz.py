"""Property-based test of ingestion over random source trees (hypothesis).

Each example builds a real source tree: valid, truncated and random-byte JPEG/PNG/GIF/WebP/BMP/TIFF
files in several pixel modes, empty files, odd names (spaces, accents, emoji, names that are not
UTF-8, hidden names), nested folders, links, and copies of earlier files within and across classes
and splits. On each one, ingestion either refuses with one clear line and writes nothing, or:
every entry is accounted for, every stored row decodes with the training decoder to one 8-bit RGB
picture of its declared size, no test picture is also in train or val, and a second run is a
cache hit.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hostile_images as hostile
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_ingest import read_rows
from torchvision.io import ImageReadMode, decode_image

from ray_jobs.errors import UserInputError
from tasks.ingest.config import IngestConfig
from tasks.ingest.pipeline import ingest

FORMAT_MODES = {  # the pixel modes each format can hold
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "L", "RGBA", "P", "LA", "I;16", "1"),
    "GIF": ("P", "L"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("RGB", "L", "P"),
    "TIFF": ("RGB", "L", "CMYK", "RGBA", "I;16"),
}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
SPLIT_FOLDERS = ("train", "valid", "test")
NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=("Cs",))


@dataclass(frozen=True)
class Spec:
    """One entry to create: where, under which name, with what content."""

    split: str
    class_name: str
    subfolder: str | None
    name: str
    content: str  # "image", "truncated", "random", "empty", "copy", "link"
    image_format: str
    mode: str
    width: int
    height: int
    seed: int
    cut: float
    raw: bytes
    not_utf8: bool
    hidden: bool


specs = st.builds(
    Spec,
    split=st.sampled_from(SPLIT_FOLDERS),
    class_name=st.sampled_from(["pizza", "sushi", "crème brûlée", "ramen 🍜"]),
    subfolder=st.none() | st.sampled_from(["nested", "deeper/still", " spaced "]),
    name=st.text(NAME_CHARS, min_size=0, max_size=12),
    content=st.sampled_from(["image", "image", "image", "truncated", "random", "empty", "copy", "copy", "link"]),
    image_format=st.sampled_from(sorted(FORMAT_MODES)),
    mode=st.integers(0, 6),
    width=st.integers(1, 24),
    height=st.integers(1, 24),
    seed=st.integers(0, 2),  # few seeds: equal pixels in different files and formats happen
    cut=st.floats(0.05, 0.95),
    raw=st.binary(min_size=1, max_size=48),
    not_utf8=st.sampled_from([False, False, False, True]),
    hidden=st.sampled_from([False, False, False, True]),
)


def image_bytes(spec: Spec) -> bytes:
    modes = FORMAT_MODES[spec.image_format]
    mode = modes[spec.mode % len(modes)]
    picture = hostile.picture(spec.width, spec.height, spec.seed)
    picture = picture.convert("I").point(lambda v: v * 256).convert("I;16") if mode == "I;16" else picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=spec.image_format)
    return buffer.getvalue()


def anchor(class_name: str, image_format: str, index: int) -> Spec:
    """A valid image of its own pixels in train/<class_name>: with one in each of two classes, most
    trees are datasets (and later copies of it make duplicates within and across splits)."""
    return Spec("train", class_name, None, "anchor", "image", image_format, index, 9 + index, 7, 100 + index,
                1.0, b"", False, False)


def build_tree(root: Path, layout: str, entries: list[Spec]) -> int:
    """Create the entries under root; returns how many entries (files and links) it made."""
    made: list[Path] = []
    for index, spec in enumerate(entries):
        folder = root / (spec.split if layout == "presplit" else "") / spec.class_name / (spec.subfolder or "")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = EXTENSIONS[spec.image_format]
        name = os.fsencode(f"{'.' if spec.hidden else ''}{index}-{spec.name.strip() or 'x'}")[:120]
        name += b"\xe9" if spec.not_utf8 else b""
        path = os.fsencode(folder) + b"/" + name + suffix.encode()
        if spec.content == "link" and made:
            os.symlink(made[spec.seed % len(made)], path)
        else:
            with open(path, "wb") as stream:
                stream.write(content(spec, made))
        made.append(Path(os.fsdecode(path)))
    return len(made)


def content(spec: Spec, made: list[Path]) -> bytes:
    if spec.content == "empty":
        return b""
    if spec.content == "random":
        return spec.raw
    if spec.content == "copy" and made:
        earlier = made[(spec.seed * 7 + spec.width) % len(made)]
        return earlier.read_bytes() if not earlier.is_symlink() else spec.raw
    data = image_bytes(spec)
    return data[: max(1, int(len(data) * spec.cut))] if spec.content == "truncated" else data


def assert_one_8bit_rgb_picture(row: dict) -> None:
    pixels = decode_image(torch.frombuffer(bytearray(row["image"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, row["height"], row["width"]), row["source_path"]


@settings(max_examples=100, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layout=st.sampled_from(["flat", "presplit"]), entries=st.lists(specs, max_size=14),
       anchor_formats=st.tuples(st.sampled_from(sorted(FORMAT_MODES)), st.sampled_from(sorted(FORMAT_MODES))),
       max_side=st.none() | st.just(16))
def test_random_source_trees_are_ingested_safely_or_refused_clearly(layout: str, entries: list[Spec],
                                                                     anchor_formats: tuple[str, str],
                                                                     max_side: int | None) -> None:
    anchors = [anchor(name, fmt, i) for i, (name, fmt) in enumerate(zip(("pizza", "sushi"), anchor_formats))]
    with tempfile.TemporaryDirectory(prefix="fuzz-ingest-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        made = build_tree(src, layout, anchors + entries)
        cfg = IngestConfig(src=src, out=str(out), workers=1, max_side=max_side, val_fraction=0.2, test_fraction=0.2)
        try:
            result = ingest(cfg)
        except UserInputError as err:  # refused: one line, nothing written
            event("refused")
            assert len(str(err).splitlines()) == 1 and str(err)
            assert not out.exists()
            return
        manifest = result.manifest
        event("ingested")
        event(f"rows re-encoded: {'some' if manifest['reencoded'] else 'none'}")
        event(f"duplicates dropped: {'some' if manifest['duplicates_dropped'] else 'none'}")
        event(f"quarantined: {'some' if manifest['quarantined'] else 'none'}")
        assert manifest["files_seen"] == made
        assert made == manifest["rows_written"] + manifest["quarantined"] + manifest["duplicates_dropped"]
        rows = read_rows(out)
        assert len(rows) == manifest["rows_written"]
        for row in rows:
            assert_one_8bit_rgb_picture(row)
        stored = {split: set() for split in ("train", "val", "test")}
        for row in rows:
            stored[row["split"]] |= {row["sha256"], hashlib.sha256(row["image"]).hexdigest()}
        assert not stored["test"] & (stored["train"] | stored["val"])
        assert len({hashlib.sha256(row["image"]).hexdigest() for row in rows}) == len(rows)
        assert ingest(cfg).skipped

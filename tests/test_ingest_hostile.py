"""Hostile input at ingestion: every folder a user points at is ingested safely, or refused clearly.

Real files throughout: images of every format and quirk built by Pillow (`hostile_images`), real
symbolic links, FIFOs, sparse files and names that are not UTF-8, decoded by the real training
decoder (`torchvision.io.decode_image` through `ray_jobs`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import hostile_images as hostile
import misbehaving_decoder
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pyarrow import fs as pafs
from test_ingest import CLASSES, assert_accounting, make_tree, read_rows, sample_files
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image

import tasks.ingest.store as store
import tasks.ingest.pipeline as ingest_module
from flows.cli.main import main
from ray_jobs.data.decode import decode_rgb, read_image
from ray_jobs.data.image_prep import MAX_IMAGE_PIXELS
from ray_jobs.data.parquet import ParquetImageDataset, read_split
from ray_jobs.data.transforms import IMAGENET, eval_transform
from ray_jobs.errors import UserInputError
from tasks.ingest.config import IngestConfig, IngestResult
from tasks.ingest.decode import check_decodes
from tasks.ingest.pipeline import ingest
from tasks.ingest.store import read_ingested_manifest

REPO = Path(__file__).resolve().parents[1]

SPLITS = ("train", "val", "test")


def run(src: Path, out: Path | str, **options: object) -> IngestResult:
    return ingest(IngestConfig(src=src, out=str(out), workers=options.pop("workers", 1), **options))


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def rows_by_source(out: Path) -> dict[str, dict]:
    return {row["source_path"]: row for row in read_rows(out)}


def training_decode(row: dict) -> torch.Tensor:
    """Decode a stored row exactly as training does, checking it is one 8-bit RGB picture of the
    size the row declares (the raw torchvision call first: no conversion may hide a 4-D tensor)."""
    raw = decode_image(torch.frombuffer(bytearray(row["image"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert raw.shape == (3, row["height"], row["width"]) and raw.dtype == torch.uint8, row["source_path"]
    pixels = decode_rgb(row["image"], row["source_path"])
    assert torch.equal(pixels, raw)
    return pixels


def as_array(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).numpy().astype(int)


# --- what training reads is what ingest checked ----------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, IngestResult]:
    """Every format and quirk in `hostile_images.mixed_formats`, in two classes, ingested once."""
    root = tmp_path_factory.mktemp("mixed")
    files = hostile.mixed_formats()
    names = sorted(files)
    write_files(root / "src" / "a", {name: files[name] for name in names[::2]})
    write_files(root / "src" / "b", {name: files[name] for name in names[1::2]})
    result = run(root / "src", root / "out", val_fraction=0.2, test_fraction=0.2)
    return root / "src", root / "out", result


def test_every_stored_row_of_a_mixed_format_source_decodes_with_the_training_decoder(mixed) -> None:
    src, out, result = mixed
    manifest = result.manifest
    assert manifest["quarantine"] == [] and manifest["duplicates"] == []
    assert manifest["rows_written"] == manifest["files_seen"] == len(hostile.mixed_formats())
    rows = read_rows(out)
    for row in rows:
        training_decode(row)
        name = row["source_path"].split("/")[-1]
        if name in hostile.STORED_AS_IS:
            assert row["image"] == (src / row["source_path"]).read_bytes(), name
        else:
            with Image.open(io.BytesIO(row["image"])) as stored:
                assert stored.format in ("PNG", "JPEG") and stored.mode == "RGB", name
    assert sum(manifest["reencoded"].values()) == len(rows) - len(hostile.STORED_AS_IS)
    # and through the training dataset and a DataLoader: one batch of equal 3-D tensors per split
    for split in SPLITS:
        dataset = ParquetImageDataset(str(out), split, eval_transform(image_size=24, norm=IMAGENET))
        images, labels = next(iter(DataLoader(dataset, batch_size=len(dataset))))
        assert images.shape == (len(dataset), 3, 24, 24) and torch.isfinite(images).all()


def test_animations_keep_their_first_frame(mixed) -> None:
    src, out, _ = mixed
    rows = rows_by_source(out)
    for name in ("gif_animated.gif", "webp_animated.webp"):
        path = next(p for p in rows if p.endswith(name))
        with Image.open(src / path) as source:
            first = np.asarray(source.convert("RGB")).astype(int)
        assert np.array_equal(as_array(training_decode(rows[path])), first), name


def test_exif_orientation_is_applied_before_storing(mixed) -> None:
    src, out, _ = mixed
    rows = rows_by_source(out)
    path = next(p for p in rows if p.endswith("jpeg_rotated.jpg"))
    row = rows[path]
    assert (row["width"], row["height"]) == (32, 48)  # stored 48 x 32, viewed upright as 32 x 48
    stored = as_array(training_decode(row))
    with Image.open(src / path) as source:
        upright = np.asarray(source.convert("RGB").transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(stored - upright).mean() < 4
    # the red block of the picture's top-left corner is now at the top right
    red = np.array((230, 20, 20))
    assert np.abs(stored[2, -3] - red).max() < 30 and np.abs(stored[2, 2] - red).max() > 60


def test_an_orientation_tag_outside_1_to_8_is_stored_as_it_is(mixed) -> None:
    # Both decoders ignore such a tag; re-encoding would cost time and a JPEG generation for nothing
    # (237 of food101_mini10's 2,000 photos carry orientation 0).
    src, out, result = mixed
    rows = rows_by_source(out)
    path = next(p for p in rows if p.endswith("jpeg_orientation_0.jpg"))
    assert rows[path]["image"] == (src / path).read_bytes()
    assert result.manifest["reencoded"]["EXIF orientation"] == 1  # jpeg_rotated.jpg only
    with Image.open(src / path) as source:
        assert np.array_equal(as_array(training_decode(rows[path])), np.asarray(source.convert("RGB")).astype(int))


def _damaged_jpegs(photo: bytes, count: int, seed: int) -> list[bytes]:
    """`photo` cut short, with bytes overwritten, or with a run of zeros: what disks and downloads do."""
    rng = random.Random(seed)
    damaged = []
    for index in range(count):
        data = bytearray(photo)
        if index % 3 == 0:
            data = data[: rng.randrange(len(data) // 4, len(data))]
        elif index % 3 == 1:
            for _ in range(30):
                data[rng.randrange(600, len(data))] = rng.randrange(256)
        else:
            start = rng.randrange(600, len(data) - 200)
            data[start:start + 200] = bytes(200)
        damaged.append(bytes(data))
    return damaged


def _refused(check, data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(Image.open(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - any decoder error is a refusal
        return True
    return False


def test_the_scaled_jpeg_check_refuses_exactly_what_a_full_decode_refuses() -> None:
    # Ingestion checks a JPEG it stores as it is at 1/8 scale (`check_decodes`): every byte of the
    # entropy-coded data is still decoded, so it must refuse the same damaged files as a full decode.
    photos = sorted((REPO / "data" / "food-sample").rglob("*.jpg"))[:8]
    outcomes = {"refused": 0, "accepted": 0}
    for number, photo in enumerate(photos):
        for data in _damaged_jpegs(photo.read_bytes(), 12, seed=number):
            full = _refused(lambda image: image.load(), data)
            assert _refused(check_decodes, data) == full, f"{photo.name}, damage {number}"
            outcomes["refused" if full else "accepted"] += 1
    assert min(outcomes.values()) >= 5, outcomes  # both outcomes were exercised


def test_sixteen_bit_images_keep_their_content(mixed) -> None:
    src, out, _ = mixed
    rows = rows_by_source(out)
    _, gray = hostile.sixteen_bit_gray()
    stored = as_array(training_decode(rows[next(p for p in rows if p.endswith("png_16bit_gray.png"))]))
    assert np.abs(stored[..., 0] - (gray >> 8)).max() <= 1 and stored.std() > 50  # a ramp, not white
    _, rgb = hostile.sixteen_bit_rgb()
    stored = as_array(training_decode(rows[next(p for p in rows if p.endswith("png_16bit_rgb.png"))]))
    assert np.abs(stored - (rgb >> 8)).max() <= 1


def test_transparent_images_are_composited_on_white(mixed) -> None:
    _, out, _ = mixed
    rows = rows_by_source(out)
    for name in ("png_rgba.png", "webp_alpha.webp", "gif_transparent.gif"):
        stored = as_array(training_decode(rows[next(p for p in rows if p.endswith(name))]))
        width = stored.shape[1]
        assert (stored[:, : width // 2 - 1] >= 250).all(), name  # transparent: white, not black
        assert np.abs(stored[:, width // 2 + 1:] - (20, 40, 220)).max() <= 8, name  # opaque blue stays


def test_cmyk_palette_and_other_formats_come_out_rgb(mixed) -> None:
    src, out, _ = mixed
    rows = rows_by_source(out)
    lossless = ("png_palette.png", "png_1bit.png", "gif.gif", "bmp.bmp", "tiff.tiff", "tiff_cmyk.tif",
                "ppm.ppm", "tga.tga")
    for name in (*lossless, "jpeg_cmyk.jpg", "mpo.mpo"):
        path = next(p for p in rows if p.endswith(name))
        with Image.open(src / path) as source:
            expected = np.asarray(source.convert("RGB")).astype(int)
        stored = as_array(training_decode(rows[path]))
        if name in lossless:  # re-encoded as PNG: exact
            assert np.array_equal(stored, expected), name
        else:  # JPEG sources are re-encoded as JPEG
            assert np.abs(stored - expected).mean() < 4, name


def test_predict_reads_every_format_as_training_sees_it(mixed) -> None:
    src, out, _ = mixed
    rows = rows_by_source(out)
    batch = []
    for path, row in rows.items():
        pixels = read_image(src / path)
        assert pixels.shape == (3, row["height"], row["width"]) and pixels.dtype == torch.uint8, path
        assert np.abs(as_array(pixels) - as_array(training_decode(row))).mean() < 4, path
        batch.append(eval_transform(image_size=24, norm=IMAGENET)(pixels))
    assert torch.stack(batch).shape == (len(rows), 3, 24, 24)  # an animated GIF no longer breaks batching


# --- nothing hangs, explodes or escapes ------------------------------------------------------------

def test_a_png_cut_before_its_end_chunk_is_stored_re_encoded(tmp_path: Path) -> None:
    """Pillow reads a PNG that lost its IEND chunk, torchvision's libpng does not ("out of bound read"):
    found by the fuzz test. Ingestion re-encodes it, so every stored row still decodes for training."""
    whole = hostile.encode(hostile.picture(1, 1), "PNG")
    cut = whole[:50]  # 50 of 69 bytes: the pixel data is there, its CRC and the end chunk are not
    with pytest.raises(RuntimeError):
        decode_image(torch.frombuffer(bytearray(cut), dtype=torch.uint8), mode=ImageReadMode.RGB)
    src = two_classes(tmp_path / "src")
    write_files(src / CLASSES[0], {"cut.png": cut})
    manifest = run(src, tmp_path / "out").manifest
    assert manifest["reencoded"] == {"PNG without its end chunk": 1}
    for row in read_rows(tmp_path / "out"):
        assert decode_rgb(row["image"], row["source_path"]).shape == (3, row["height"], row["width"])


def two_classes(root: Path, count: int = 3) -> Path:
    return make_tree(root, {c: count for c in CLASSES[:2]})


def quarantine_reasons(manifest: dict) -> dict[str, str]:
    return {q["path"]: q["reason"] for q in manifest["quarantine"]}


@pytest.mark.timeout(120)
def test_symlinks_are_never_followed_loops_escapes_and_cross_class_links(tmp_path: Path, capsys) -> None:
    src = two_classes(tmp_path / "src")
    a, b = CLASSES[:2]
    outside = tmp_path / "outside"
    write_files(outside, {"secret.jpg": hostile.encode(hostile.picture(seed=99), "JPEG")})
    victim = sorted((src / a).iterdir())[0]
    (src / a / "loop").symlink_to(src / a)  # a folder link to its own parent: endless if followed
    (src / a / "up").symlink_to("..")
    (src / a / "escape.jpg").symlink_to(outside / "secret.jpg")  # a file outside SRC
    (src / a / "escape_dir").symlink_to(outside)
    (src / b / "from_a.jpg").symlink_to(victim)  # would be a b-labelled copy of an a image
    (src / "c").symlink_to(src / a)  # a whole class folder linked: would relabel class a as c
    code = main(["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    out_text = capsys.readouterr().out
    assert code == 0
    manifest = read_ingested_manifest(tmp_path / "out")
    links = {f"{a}/loop", f"{a}/up", f"{a}/escape.jpg", f"{a}/escape_dir", f"{b}/from_a.jpg", "c"}
    reasons = quarantine_reasons(manifest)
    assert set(reasons) == links and all("symbolic link" in reasons[p] and "not followed" in reasons[p] for p in links)
    assert str(outside / "secret.jpg") in reasons[f"{a}/escape.jpg"]  # the report names the target
    assert manifest["links_not_followed"] == len(links)
    assert manifest["classes"] == [a, b]
    assert manifest["files_seen"] == 6 + len(links) and manifest["rows_written"] == 6
    assert_accounting(manifest)
    rows = read_rows(tmp_path / "out")
    assert all(row["source_path"].split("/")[0] == row["class_name"] for row in rows)  # no relabelled image
    secret = hashlib.sha256((outside / "secret.jpg").read_bytes()).hexdigest()
    assert secret not in {row["sha256"] for row in rows}
    assert f"{len(links)} symbolic link(s) not followed" in out_text


@pytest.mark.timeout(60)
def test_fifos_and_special_files_are_quarantined_unread(tmp_path: Path) -> None:
    src = two_classes(tmp_path / "src")
    os.mkfifo(src / CLASSES[0] / "pipe.jpg")  # opening it for reading would block forever
    manifest = run(src, tmp_path / "out").manifest
    assert quarantine_reasons(manifest) == {f"{CLASSES[0]}/pipe.jpg": "not a regular file (named pipe), not read"}
    assert_accounting(manifest)


def test_names_that_are_not_utf8_are_quarantined_with_an_escaped_name(tmp_path: Path, capsys) -> None:
    src = two_classes(tmp_path / "src")
    jpeg = sample_files(CLASSES[0], 4)[3].read_bytes()
    root = os.fsencode(src)
    with open(root + b"/" + os.fsencode(CLASSES[0]) + b"/caf\xe9.jpg", "wb") as stream:  # Latin-1 name
        stream.write(jpeg)
    os.mkdir(root + b"/\xff\xfe-class")
    with open(root + b"/\xff\xfe-class/photo.jpg", "wb") as stream:
        stream.write(sample_files(CLASSES[2], 1)[0].read_bytes())
    code = main(["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    text = (tmp_path / "out" / "manifest.json").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    manifest = json.loads(text)
    reasons = quarantine_reasons(manifest)
    assert set(reasons) == {f"{CLASSES[0]}/caf\\xe9.jpg", "\\xff\\xfe-class/photo.jpg"}
    assert all("not valid UTF-8" in reason for reason in reasons.values())
    assert manifest["classes"] == CLASSES[:2]
    assert_accounting(manifest)
    # a second run reads the same names: a cache hit
    assert run(src, tmp_path / "out").skipped


def test_a_huge_file_is_quarantined_by_its_size_without_being_read(tmp_path: Path) -> None:
    src = two_classes(tmp_path / "src")
    with open(src / CLASSES[0] / "holiday.jpg", "wb") as stream:  # sparse: costs no disk and no memory
        stream.truncate(3 * 2**30)
    # A fresh interpreter, so the peak is this ingest's, not that of the tests that ran before in this process.
    # Its own peak is VmHWM (ru_maxrss would carry this big process's peak over the fork and exec); its decode
    # workers, spawned from the small interpreter, report theirs through RUSAGE_CHILDREN.
    measure = ("import re, resource, sys; from pathlib import Path; from tasks.ingest.config import IngestConfig; "
               "from tasks.ingest.pipeline import ingest; ingest(IngestConfig(src=sys.argv[1], out=sys.argv[2], "
               "workers=1)); own = int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())[1]); "
               "print(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024)")
    done = subprocess.run([sys.executable, "-c", measure, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=REPO, check=True)
    manifest = read_ingested_manifest(tmp_path / "out")
    reason = quarantine_reasons(manifest)[f"{CLASSES[0]}/holiday.jpg"]
    assert reason.startswith("too large: 3,221,225,472 bytes") and "not read" in reason
    assert_accounting(manifest)
    peak_bytes = int(done.stdout.split()[-1])
    print(f"peak RSS of the ingest: {peak_bytes / 2**20:.0f} MiB")
    assert peak_bytes < 2**30  # reading the file whole would have taken 3 GiB
    # the limit is an option: sample photos (~5 kB) are over a 1 kB limit, 8 px PNGs are not
    for seed, class_name in enumerate(CLASSES[:2]):
        (src / class_name / "tiny.png").write_bytes(hostile.encode(hostile.picture(8, 8, seed=seed), "PNG"))
    assert main(["ingest", str(src), "--out", str(tmp_path / "out-limited"), "--max-file-bytes", "1000",
                 "--workers", "1"]) == 0
    limited = read_ingested_manifest(tmp_path / "out-limited")
    assert limited["rows_written"] == 2 and limited["quarantined"] == 7
    assert all(reason.startswith("too large") for reason in quarantine_reasons(limited).values())


def test_decompression_bombs_are_quarantined_before_decoding(tmp_path: Path) -> None:
    src = two_classes(tmp_path / "src")
    side = int(MAX_IMAGE_PIXELS**0.5) + 16  # just over the limit, under Pillow's own
    bombs = {"bomb.png": hostile.png_bomb(side, side), "big_bomb.png": hostile.png_bomb(20000, 20000)}
    assert all(len(data) < 200_000 for data in bombs.values())
    write_files(src / CLASSES[0], bombs)
    manifest = run(src, tmp_path / "out").manifest
    reasons = quarantine_reasons(manifest)
    assert set(reasons) == {f"{CLASSES[0]}/{name}" for name in bombs}
    assert all(reason.startswith("decompression bomb") for reason in reasons.values())
    assert_accounting(manifest)


def strips() -> dict[str, bytes]:
    """Tiny files promising degenerate shapes: each passes the pixel limit, and the eval resize (short
    side to 256) would make the first two 8.4 M pixels long and the JPEG 65500 x 2 -> 8.4 M x 256."""
    return {"wide.png": hostile.png_bomb(65536, 1), "tall.png": hostile.png_bomb(1, 65536),
            "wide.jpg": hostile.encode(Image.new("RGB", (65500, 2), (200, 120, 40)), "JPEG")}


def test_degenerate_strips_are_quarantined_naming_the_limit(tmp_path: Path) -> None:
    src = two_classes(tmp_path / "src")
    write_files(src / CLASSES[0], strips())
    assert all(len(data) < 20_000 for data in strips().values())
    manifest = run(src, tmp_path / "out").manifest
    reasons = quarantine_reasons(manifest)
    assert set(reasons) == {f"{CLASSES[0]}/{name}" for name in strips()}
    assert reasons[f"{CLASSES[0]}/wide.png"] == "image 65536 x 1: a side over the limit of 16,384 pixels"
    assert reasons[f"{CLASSES[0]}/wide.jpg"] == "image 65500 x 2: a side over the limit of 16,384 pixels"
    assert_accounting(manifest)


def test_an_elongated_image_within_the_side_limit_is_refused_by_its_aspect_ratio(tmp_path: Path) -> None:
    strip = tmp_path / "strip.png"
    strip.write_bytes(hostile.encode(Image.new("RGB", (1700, 100), (10, 200, 30)), "PNG"))  # 17:1
    with pytest.raises(UserInputError, match=f"{strip}: image 1700 x 100: aspect ratio over the limit of 16:1"):
        read_image(strip)
    fine = tmp_path / "fine.png"
    fine.write_bytes(hostile.encode(Image.new("RGB", (1600, 100), (10, 200, 30)), "PNG"))  # 16:1 passes
    pixels = read_image(fine)
    out = eval_transform(image_size=32, norm=IMAGENET)(pixels)
    assert tuple(out.shape) == (3, 32, 32)


def test_predict_refuses_strips_naming_the_file_and_the_limit(tmp_path: Path, capsys, trained_checkpoint) -> None:
    paths = []
    for name, data in strips().items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    assert main(["predict", *map(str, paths), "--model", trained_checkpoint]) == 2  # bad input, as any unreadable file
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 3
    for path, line in zip(paths, err.splitlines(), strict=True):
        assert line.startswith(f"train-food predict: error: {path}: image ") and "over the limit of 16,384" in line


def bomb_dataset(root: Path) -> str:
    """A dataset (as an older or foreign writer might leave it) whose train split holds a bomb row."""
    good = sample_files(CLASSES[0], 1)[0].read_bytes()
    import pyarrow as pa

    table = pa.table({"image": [good, hostile.png_bomb(9000, 9000)], "label": pa.array([0, 1], pa.int32())})
    (root / "train").mkdir(parents=True)
    pq.write_table(table, root / "train" / "part-00000.parquet")
    (root / "manifest.json").write_text(json.dumps({"shards": {"train": ["train/part-00000.parquet"]}}))
    return str(root)


def test_training_decoder_refuses_an_image_over_the_pixel_limit_in_one_line(tmp_path: Path) -> None:
    dataset = ParquetImageDataset(bomb_dataset(tmp_path / "ds"), "train", lambda pixels: pixels)
    pixels, label = dataset[0]
    assert pixels.shape[0] == 3 and label == 0
    with pytest.raises(UserInputError, match=r"split train row 1: decompression bomb: 9000 x 9000"):
        dataset[1]
    loader = DataLoader(dataset, batch_size=1, num_workers=1)  # the error crosses a worker process
    with pytest.raises(UserInputError) as raised:
        list(loader)
    assert "row 1: decompression bomb" in str(raised.value) and len(str(raised.value).splitlines()) == 1


def test_predict_refuses_images_over_the_pixel_limit_naming_the_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(hostile.png_bomb(9000, 9000))
    with pytest.raises(UserInputError, match=f"{bomb}: decompression bomb"):
        read_image(bomb)
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as stream:
        stream.truncate(3 * 2**30)
    with pytest.raises(UserInputError, match=f"{huge}: too large"):
        read_image(huge)


# --- outputs inside the source, leftovers, object stores --------------------------------------------

def test_an_output_folder_inside_the_source_never_becomes_a_class(tmp_path: Path) -> None:
    src = two_classes(tmp_path / "src")
    first = run(src, src / "dataset")
    assert run(src, src / "dataset").skipped  # the dataset inside SRC does not change SRC's fingerprint
    # a killed run's temporary folders inside SRC are ignored too, and reported next to DIR
    leftover = src / f"dataset.tmp-{uuid.uuid4().hex}"
    shutil.copytree(src / "dataset", leftover)
    shutil.rmtree(leftover / "val")
    (leftover / "manifest.json").unlink()
    elsewhere = run(src, tmp_path / "elsewhere")
    manifest = elsewhere.manifest
    assert manifest["fingerprint"] == first.manifest["fingerprint"] and manifest["classes"] == CLASSES[:2]
    assert manifest["skipped_folders"] == [
        {"path": "dataset", "reason": "a train-food dataset (an ingest output), not photos"},
        {"path": leftover.name, "reason": "temporary folder of an ingest (interrupted or still running), not photos"},
    ]
    assert manifest["files_seen"] == 6 and manifest["quarantine"] == []
    assert "skipped folder dataset: a train-food dataset" in elsewhere.summary()
    again = run(src, src / "dataset")  # the next ingest of DIR removes the killed run's folder
    assert again.skipped and again.cleaned == (str(leftover),) and not leftover.exists()
    assert f"cleaned up {leftover}, left by an interrupted ingest" in again.summary()


def subtree(monkeypatch: pytest.MonkeyPatch, base: Path) -> pafs.FileSystem:
    """Route `ingest --out bucket://NAME` to a real pyarrow file system that, like an object store,
    cannot rename folders (`SubTreeFileSystem` is not a `LocalFileSystem`)."""
    base.mkdir(parents=True, exist_ok=True)
    fs = pafs.SubTreeFileSystem(str(base), pafs.LocalFileSystem())
    monkeypatch.setattr(store, "open_output", lambda uri: (fs, uri.removeprefix("bucket://")))
    return fs


def all_rows(dataset: str) -> dict[str, list]:
    return {split: read_split(dataset, split).to_pylist() for split in SPLITS}


def fail_at_the_switch(monkeypatch: pytest.MonkeyPatch, dest: str) -> None:
    """Fail the write of DIR/manifest.json, after the new shards are in place beside the old ones."""
    real = store.write_manifest

    def write(fs, root, manifest):
        if root == dest:
            raise OSError("connection reset while writing the manifest")
        real(fs, root, manifest)

    monkeypatch.setattr(store, "write_manifest", write)


def test_object_store_publish_keeps_the_previous_dataset_until_the_new_one_is_complete(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    bucket = tmp_path / "bucket"
    fs = subtree(monkeypatch, bucket)
    src = two_classes(tmp_path / "src", 5)
    before = run(src, "bucket://ds", shard_rows=2).manifest
    rows = all_rows(str(bucket / "ds"))
    with monkeypatch.context() as patch:
        fail_at_the_switch(patch, "ds")
        with pytest.raises(OSError, match="connection reset"):
            run(src, "bucket://ds", shard_rows=2, force=True)
    assert read_ingested_manifest("bucket://ds") == before  # the old dataset, whole
    assert all_rows(str(bucket / "ds")) == rows
    generations = [e.base_name for e in fs.get_file_info(pafs.FileSelector("ds")) if e.base_name.startswith("gen-")]
    assert len(generations) == 2  # the unpublished new shards sit beside the old ones, unread
    assert not [e for e in fs.get_file_info(pafs.FileSelector("")) if ".tmp-" in e.base_name]

    after = run(src, "bucket://ds", shard_rows=2, force=True).manifest
    assert read_ingested_manifest("bucket://ds") == after and all_rows(str(bucket / "ds")) == rows
    left = sorted(e.base_name for e in fs.get_file_info(pafs.FileSelector("ds")))
    assert left == sorted([after["shards"]["train"][0].split("/")[0], "manifest.json"])  # old shards deleted


def test_an_interrupted_first_publish_to_an_object_store_is_cleaned_up_by_the_next(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    bucket = tmp_path / "bucket"
    fs = subtree(monkeypatch, bucket)
    src = two_classes(tmp_path / "src")
    with monkeypatch.context() as patch:
        fail_at_the_switch(patch, "ds")
        with pytest.raises(OSError):
            run(src, "bucket://ds")
    with pytest.raises(UserInputError, match="no manifest.json"):
        read_ingested_manifest("bucket://ds")  # half a dataset is never a dataset
    manifest = run(src, "bucket://ds").manifest
    assert read_ingested_manifest("bucket://ds") == manifest
    assert len([e for e in fs.get_file_info(pafs.FileSelector("ds")) if e.base_name.startswith("gen-")]) == 1
    assert sum(len(v) for v in all_rows(str(bucket / "ds")).values()) == 6


def test_an_unchanged_source_is_known_from_its_index_and_a_touched_one_is_read_again(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    src = two_classes(tmp_path / "src")
    (src / CLASSES[0] / "link.jpg").symlink_to(sorted((src / CLASSES[1]).iterdir())[0])
    first = run(src, tmp_path / "out")
    log = tmp_path / "reads.txt"
    log.touch()
    monkeypatch.setenv("TRAIN_FOOD_TEST_READS", str(log))  # the decode workers inherit it
    monkeypatch.setattr(ingest_module, "inspect_image", misbehaving_decoder.counting_decode)
    assert run(src, tmp_path / "out").skipped and log.read_text() == ""  # every stamp as recorded: no read
    touched = sorted((src / CLASSES[0]).glob("*.jpg"))[0]
    os.utime(touched)  # a new mtime, the same bytes: read again (each file once), the same build
    again = run(src, tmp_path / "out")
    assert again.skipped and again.manifest["fingerprint"] == first.manifest["fingerprint"]
    reads = log.read_text().splitlines()
    assert len(reads) == len(set(reads)) == first.manifest["files_seen"] - 1  # all but the link, once each

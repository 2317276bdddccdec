"""Tests of the ingestion stage (`tasks/ingest*.py` and `train-food ingest`).

Every test builds a small source tree in tmp_path from the committed real-photo sample
(128 px JPEGs), so each run takes well under a second with `workers=1`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import misbehaving_decoder
import pytest
from PIL import Image
from pyarrow.fs import FileSelector, _MockFileSystem

import tasks.ingest.fingerprint as fingerprint_module
import tasks.ingest.pipeline as ingest_module
import tasks.ingest.scan as scan_module
import tasks.ingest.store as store
from flows.cli.main import main
from ray_jobs.errors import UserInputError
from tasks.ingest.config import IngestConfig, IngestResult
from tasks.ingest.decode import jpeg_picture_digest
from tasks.ingest.fingerprint import ingest_code_version
from tasks.ingest.pipeline import ingest
from tasks.ingest.store import read_ingested_manifest

SAMPLE = Path(__file__).parents[1] / "data/food-sample"
CLASSES = sorted(p.name for p in (SAMPLE / "train").iterdir() if p.is_dir())

EXPECTED_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("label", pa.int32()),
    ("class_name", pa.string()),
    ("split", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source_path", pa.string()),
])


# --- helpers -------------------------------------------------------------------------------------

def sample_files(class_name: str, count: int, split: str = "train") -> list[Path]:
    files = sorted((SAMPLE / split / class_name).glob("*.jpg"))
    assert len(files) >= count, f"sample has only {len(files)} {split} images of {class_name}"
    return files[:count]


def make_tree(root: Path, sizes: dict[str, int], split: str | None = None, sample_split: str = "train") -> Path:
    """Copy `sizes[class]` sample images per class into root/<class>/ (or root/<split>/<class>/)."""
    for class_name, count in sizes.items():
        folder = root / split / class_name if split else root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for path in sample_files(class_name, count, sample_split):
            shutil.copy2(path, folder / path.name)
    return root


def run(src: Path, out: Path | str, **options: object) -> IngestResult:
    return ingest(IngestConfig(src=src, out=str(out), workers=options.pop("workers", 1), **options))


def built_fingerprint(src: Path, **options: object) -> str:
    """The fingerprint `ingest` records for SRC with these options (into a fresh folder beside SRC)."""
    outs = src.parent / "fingerprints"
    outs.mkdir(exist_ok=True)
    return run(src, outs / f"out-{len(list(outs.iterdir()))}", **options).manifest["fingerprint"]


def read_rows(out: Path) -> list[dict]:
    """All rows of all shards listed in the manifest, in shard then row order."""
    manifest = json.loads((out / "manifest.json").read_text())
    tables = [pq.read_table(out / shard) for split in ("train", "val", "test") for shard in manifest["shards"][split]]
    return pa.concat_tables(tables).to_pylist()


def assignment(out: Path) -> dict[str, str]:
    return {row["source_path"]: row["split"] for row in read_rows(out)}


def assert_accounting(manifest: dict) -> None:
    assert manifest["files_seen"] == manifest["rows_written"] + manifest["quarantined"] + manifest["duplicates_dropped"]
    assert manifest["quarantined"] == len(manifest["quarantine"])
    assert manifest["duplicates_dropped"] == len(manifest["duplicates"])
    assert manifest["rows_written"] == sum(sum(c.values()) for c in manifest["counts"].values())


def temp_leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- splitting -----------------------------------------------------------------------------------

def test_split_is_deterministic_per_seed(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 20 for c in CLASSES[:3]})
    first = run(src, tmp_path / "a", seed=0)
    again = run(src, tmp_path / "b", seed=0)
    other = run(src, tmp_path / "c", seed=1)
    assert read_rows(tmp_path / "a") == read_rows(tmp_path / "b")  # same split and same row order
    assert assignment(tmp_path / "a") != assignment(tmp_path / "c")
    assert first.manifest["counts"] == other.manifest["counts"] == again.manifest["counts"]


def test_split_ignores_file_system_listing_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(tmp_path / "src", {c: 12 for c in CLASSES[:3]})
    run(src, tmp_path / "listed")
    real_walk = os.walk

    def reversed_walk(top, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, **kwargs):
            dirnames.reverse()
            yield dirpath, dirnames, filenames[::-1]

    monkeypatch.setattr(scan_module.os, "walk", reversed_walk)
    run(src, tmp_path / "reversed")
    assert read_rows(tmp_path / "listed") == read_rows(tmp_path / "reversed")


def test_split_is_stratified_and_small_classes_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sizes = {CLASSES[0]: 30, CLASSES[1]: 13, CLASSES[2]: 7, CLASSES[3]: 3, CLASSES[4]: 2}
    src = make_tree(tmp_path / "src", sizes)
    manifest = run(src, tmp_path / "out", val_fraction=0.2, test_fraction=0.1).manifest
    counts = manifest["counts"]
    for class_name, n in list(sizes.items())[:4]:
        assert all(counts[split][class_name] >= 1 for split in ("train", "val", "test")), class_name
        assert abs(counts["val"][class_name] - 0.2 * n) <= 1
        assert abs(counts["test"][class_name] - 0.1 * n) <= 1
        assert sum(counts[split][class_name] for split in counts) == n
    assert manifest["small_classes"] == [{"class_name": CLASSES[4], "images": 2, "missing_from": ["val", "test"]}]
    assert CLASSES[4] in caplog.text
    # rows are shuffled within a split: a streaming reader does not see one class after another
    train_classes = [row["class_name"] for row in read_rows(tmp_path / "out") if row["split"] == "train"]
    assert train_classes != sorted(train_classes)


def test_presplit_source_keeps_its_splits_and_carves_val_from_train(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, {c: 12 for c in CLASSES[:3]}, split="train")
    make_tree(src, {c: 4 for c in CLASSES[:3]}, split="test", sample_split="test")
    manifest = run(src, tmp_path / "out").manifest
    assert manifest["layout"] == "presplit"
    assert manifest["splits_carved"] == {"val": "train"}
    rows = read_rows(tmp_path / "out")
    by_split = {s: {r["source_path"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert by_split["test"] == {p.relative_to(src).as_posix() for p in (src / "test").rglob("*.jpg")}
    assert all(path.startswith("train/") for path in by_split["val"] | by_split["train"])
    assert all(manifest["counts"]["val"][c] == 1 for c in CLASSES[:3])  # round(12 * 0.1)
    assert "val carved from train" in IngestResult(str(tmp_path / "out"), manifest, False).summary()


@pytest.mark.parametrize("val_folder", ["val", "valid", "validation"])
def test_presplit_val_folder_aliases_are_not_carved(tmp_path: Path, val_folder: str) -> None:
    src = tmp_path / "src"
    make_tree(src, {c: 4 for c in CLASSES[:2]}, split="train")
    make_tree(src, {c: 2 for c in CLASSES[:2]}, split=val_folder, sample_split="test")
    make_tree(src, {c: 2 for c in CLASSES[:2]}, split="test", sample_split="test")
    manifest = run(src, tmp_path / "out").manifest
    assert manifest["splits_carved"] == {}
    val_paths = {r["source_path"] for r in read_rows(tmp_path / "out") if r["split"] == "val"}
    assert len(val_paths) == 4 and all(p.startswith(f"{val_folder}/") for p in val_paths)


# --- duplicates and quarantine -------------------------------------------------------------------

def test_exact_duplicates_are_kept_once_and_never_in_two_splits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, {c: 10 for c in CLASSES[:2]}, split="train")
    make_tree(src, {c: 3 for c in CLASSES[:2]}, split="test", sample_split="test")
    original = sample_files(CLASSES[0], 1)[0]
    shutil.copy(original, src / "train" / CLASSES[1] / "copy_in_other_class.jpg")
    shutil.copy(original, src / "test" / CLASSES[0] / "copy_in_test.jpg")
    manifest = run(src, tmp_path / "out").manifest

    kept = f"train/{CLASSES[0]}/{original.name}"
    picture = jpeg_picture_digest(original.read_bytes())
    assert sorted(manifest["duplicates"], key=lambda d: d["path"]) == [
        {"path": f"test/{CLASSES[0]}/copy_in_test.jpg", "kept": kept, "sha256": _sha(original),
         "picture_sha256": picture},
        {"path": f"train/{CLASSES[1]}/copy_in_other_class.jpg", "kept": kept, "sha256": _sha(original),
         "picture_sha256": picture},
    ]
    rows = read_rows(tmp_path / "out")
    assert len({r["sha256"] for r in rows}) == len(rows)
    assert [r["source_path"] for r in rows if r["sha256"] == _sha(original)] == [kept]
    assert manifest["duplicates_dropped"] == 2
    assert_accounting(manifest)


def test_one_picture_with_other_metadata_is_a_duplicate_and_another_picture_is_not(tmp_path: Path) -> None:
    # Food-101's test/apple_pie holds two files with one picture and different EXIF bytes.
    src = tmp_path / "src"
    make_tree(src, {c: 4 for c in CLASSES[:2]})
    original = sample_files(CLASSES[0], 1)[0]
    with Image.open(original) as image:
        exif = image.getexif()
        exif[0x010E] = "re-tagged by a photo manager"  # ImageDescription
        exif[0x0112] = 0  # an orientation tag outside 1-8: shown as stored
        pixels_saved_again = io.BytesIO()
        image.save(pixels_saved_again, format="JPEG", quality=70)  # another picture: new pixels
    data = original.read_bytes()
    retagged = data[:2] + _app1(exif.tobytes()) + data[2:]
    (src / CLASSES[1] / "retagged.jpg").write_bytes(retagged)
    (src / CLASSES[1] / "saved_again.jpg").write_bytes(pixels_saved_again.getvalue())
    manifest = run(src, tmp_path / "out").manifest

    assert _sha(src / CLASSES[1] / "retagged.jpg") != _sha(original)
    assert [(d["path"], d["kept"]) for d in manifest["duplicates"]] == [
        (f"{CLASSES[1]}/retagged.jpg", f"{CLASSES[0]}/{original.name}")]
    assert manifest["rows_written"] == 9 and manifest["reencoded"] == {}  # saved_again kept, nothing re-encoded
    assert_accounting(manifest)


def _app1(exif: bytes) -> bytes:
    """An APP1 segment holding `exif` (Pillow's `Exif.tobytes()` starts with b"Exif\\0\\0")."""
    return b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_bad_files(src: Path) -> dict[str, str]:
    """Add unusable files to a flat tree; returns {relative path: expected reason fragment}."""
    good = sample_files(CLASSES[0], 1)[0].read_bytes()
    folder = src / CLASSES[0]
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.jpg").write_bytes(good[:600] + bytes(len(good) - 600))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / "text_named.jpg").write_text("hello\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "README.txt").write_text("loose file at the top\n")
    (folder / "broken_link.jpg").symlink_to(src / "does-not-exist.jpg")
    c = CLASSES[0]
    return {
        f"{c}/truncated.jpg": "truncated", f"{c}/corrupt.jpg": "corrupt", f"{c}/zero.jpg": "empty",
        f"{c}/notes.txt": "not an image", f"{c}/text_named.jpg": "not an image",
        f"{c}/.DS_Store": "hidden", "README.txt": "not inside a class folder",
        f"{c}/broken_link.jpg": "symbolic link",
    }


def test_bad_files_are_quarantined_with_a_reason_and_never_vanish(tmp_path: Path, capsys) -> None:
    src = make_tree(tmp_path / "src", {c: 6 for c in CLASSES[:2]})
    expected = make_bad_files(src)
    code = main(["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert code == 0
    manifest = read_ingested_manifest(tmp_path / "out")
    reasons = {q["path"]: q["reason"] for q in manifest["quarantine"]}
    assert set(reasons) == set(expected)
    for path, fragment in expected.items():
        assert fragment in reasons[path], (path, reasons[path])
    assert manifest["rows_written"] == 12 and manifest["files_seen"] == 12 + len(expected)
    assert_accounting(manifest)
    assert f"{12 + len(expected)} files seen = 12 rows written + {len(expected)} quarantined" in capsys.readouterr().out


def test_process_pool_gives_the_same_dataset_as_inline(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 5 for c in CLASSES[:2]})
    make_bad_files(src)
    inline = run(src, tmp_path / "inline", workers=1, max_side=64).manifest
    pooled = run(src, tmp_path / "pooled", workers=2, max_side=64).manifest
    assert read_rows(tmp_path / "inline") == read_rows(tmp_path / "pooled")
    assert inline["quarantine"] == pooled["quarantine"]


# --- output: atomicity, skipping, object stores ---------------------------------------------------

def _fail_after_first_shard(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    real_write = store.write_shard
    calls = []

    def write_then_fail(fs, path, rows):
        if calls:
            raise error
        calls.append(path)
        real_write(fs, path, rows)

    monkeypatch.setattr(store, "write_shard", write_then_fail)


def test_failure_mid_write_leaves_no_dataset_and_no_temp_dir(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src", {c: 10 for c in CLASSES[:2]})
    _fail_after_first_shard(monkeypatch, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        run(src, tmp_path / "out", shard_rows=4)
    assert not (tmp_path / "out").exists()
    assert temp_leftovers(tmp_path) == []


def test_interrupted_rebuild_keeps_the_previous_dataset(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src", {c: 10 for c in CLASSES[:2]})
    before = run(src, tmp_path / "out", shard_rows=4).manifest
    _fail_after_first_shard(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", shard_rows=4, force=True)
    assert read_ingested_manifest(tmp_path / "out") == before
    assert len(read_rows(tmp_path / "out")) == 20
    assert temp_leftovers(tmp_path) == []


def test_failed_swap_restores_the_previous_dataset(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src", {c: 4 for c in CLASSES[:2]})
    before = run(src, tmp_path / "out").manifest
    real_rename = os.rename

    def rename_but_not_into_place(source, target):
        if ".tmp-" in str(source):
            raise OSError("rename failed")
        real_rename(source, target)

    monkeypatch.setattr(store.os, "rename", rename_but_not_into_place)
    with pytest.raises(OSError, match="rename failed"):
        run(src, tmp_path / "out", force=True)
    assert read_ingested_manifest(tmp_path / "out") == before
    assert temp_leftovers(tmp_path) == []


def test_rerun_is_skipped_unless_forced_and_force_rebuilds_the_same_build(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src", {c: 6 for c in CLASSES[:2]})
    out = tmp_path / "out"
    first = run(src, out)
    assert not first.skipped
    assert first.manifest["fingerprint"] == built_fingerprint(src)  # another folder, the same build
    assert first.manifest["ingest_code_version"] == ingest_code_version()
    manifest_mtime = (out / "manifest.json").stat().st_mtime_ns

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("an up-to-date dataset must not be decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "inspect_image", no_decoding)
        second = run(src, out)
    assert second.skipped and "up to date" in second.summary()
    assert (out / "manifest.json").stat().st_mtime_ns == manifest_mtime

    forced = run(src, out, force=True)
    assert not forced.skipped and forced.manifest["fingerprint"] == first.manifest["fingerprint"]
    assert (out / "manifest.json").stat().st_mtime_ns != manifest_mtime
    assert read_rows(out) == read_rows_of(first, out)
    shutil.copy(sample_files(CLASSES[2], 1)[0], src / CLASSES[0] / "new.jpg")  # a new build: another folder
    rebuilt = run(src, tmp_path / "out-2")
    assert not rebuilt.skipped and rebuilt.manifest["rows_written"] == 13
    assert temp_leftovers(tmp_path) == []


def read_rows_of(result: IngestResult, out: Path) -> list[dict]:
    """The rows a result describes (its manifest's shards under out)."""
    assert json.loads((out / "manifest.json").read_text())["shards"] == result.manifest["shards"]
    return read_rows(out)


def test_output_can_be_any_pyarrow_filesystem(tmp_path: Path, monkeypatch) -> None:
    """Object stores cannot rename folders: files are moved one by one, manifest last."""
    mock = _MockFileSystem()
    monkeypatch.setattr(store, "open_output", lambda uri: (mock, uri.removeprefix("mock://")))
    src = make_tree(tmp_path / "src", {c: 4 for c in CLASSES[:2]})
    run(src, "mock://bucket/ds", shard_rows=2)
    assert run(src, "mock://bucket/ds", shard_rows=2).skipped
    with pytest.raises(UserInputError, match="another dataset build"):
        run(src, "mock://bucket/ds", shard_rows=3, force=True)
    replaced = run(src, "mock://bucket/ds", force=True, shard_rows=2)
    paths = sorted(info.path for info in mock.get_file_info(FileSelector("bucket", recursive=True)))
    assert not [p for p in paths if ".tmp-" in p]
    shards = [p for p in paths if p.endswith(".parquet")]
    assert sorted(shards) == sorted(f"bucket/ds/{s}" for split in replaced.manifest["shards"].values() for s in split)
    assert read_ingested_manifest("mock://bucket/ds") == replaced.manifest


# --- fingerprints: content-addressed, immutable builds --------------------------------------------

def test_fingerprint_sees_changed_bytes_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    before = run(src, tmp_path / "out").manifest["fingerprint"]
    target = sorted((src / CLASSES[0]).iterdir())[0]
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the JPEG
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert built_fingerprint(src) != before  # the source index compares ctime too: the file is read again
    with pytest.raises(UserInputError, match="another dataset build"):  # not "up to date"
        run(src, tmp_path / "out")


def test_fingerprint_sees_an_empty_class_folder(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    before = built_fingerprint(src)
    (src / "empty_class").mkdir()  # a class with no images changes the label set
    assert built_fingerprint(src) != before


def test_fingerprint_changes_with_the_ingest_code_version(tmp_path: Path, monkeypatch) -> None:
    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    real = ingest_code_version()
    assert len(real) == 64
    before = built_fingerprint(src)
    monkeypatch.setattr(fingerprint_module, "ingest_code_version", lambda: "edited-ingest-code")
    assert built_fingerprint(src) != before
    assert run(src, tmp_path / "out").manifest["ingest_code_version"] == "edited-ingest-code"


def test_fingerprint_changes_with_every_option(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    base = built_fingerprint(src)
    for change in ({"seed": 1}, {"max_side": 64}, {"val_fraction": 0.2}, {"test_fraction": 0.2},
                   {"shard_rows": 7}, {"shard_bytes": 1000}, {"max_file_bytes": 10_000_000}):
        assert built_fingerprint(src, **change) != base, change
    assert built_fingerprint(src, workers=2, force=True) == base  # these do not change the output


def test_a_different_seed_is_another_build_in_another_folder(tmp_path: Path) -> None:
    from flows.pipeline_config import PipelineConfig

    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    configs = [PipelineConfig(source=str(src), workspace=str(tmp_path / "ws"), seed=seed).ingest() for seed in (0, 1)]
    results = [ingest(cfg.model_copy(update={"workers": 1})) for cfg in configs]
    assert results[0].manifest["fingerprint"] != results[1].manifest["fingerprint"]
    assert [Path(result.out).name for result in results] == [f"src-{result.manifest['fingerprint'][:16]}"
                                                              for result in results]


def test_ingest_never_replaces_another_build(tmp_path: Path, capsys) -> None:
    src = make_tree(tmp_path / "src", {c: 4 for c in CLASSES[:2]})
    out = tmp_path / "out"
    first = run(src, out)
    manifest_bytes = (out / "manifest.json").read_bytes()
    rows = read_rows(out)
    other = built_fingerprint(src, seed=1)
    for force in (False, True):  # --force rebuilds the same build only
        with pytest.raises(UserInputError) as raised:
            run(src, out, seed=1, force=force)
        message = str(raised.value)
        assert str(out) in message and "another --out" in message
        assert first.manifest["fingerprint"][:16] in message and other[:16] in message
    capsys.readouterr()
    code = main(["ingest", str(src), "--out", str(out), "--seed", "1", "--force", "--workers", "1"])
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the decoding bar, which erases itself
    assert code == 2 and err.startswith("train-food ingest: error:") and len(err.strip().splitlines()) == 1
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert read_rows(out) == rows
    assert temp_leftovers(tmp_path) == []


def test_a_file_rewritten_during_ingest_is_stored_as_the_bytes_its_hash_names(tmp_path: Path, monkeypatch) -> None:
    """One read per file: the hash, the decode check and the stored bytes cannot disagree, whenever the
    file changes; a rerun sees the new stamp, reads the file again and finds the same build."""
    src = make_tree(tmp_path / "src", {c: 4 for c in CLASSES[:2]})
    victim = sorted((src / CLASSES[1]).iterdir())[-1]
    monkeypatch.setenv("TRAIN_FOOD_TEST_VICTIM", str(victim))  # the decode workers inherit it
    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "inspect_image", misbehaving_decoder.rewrite_then_decode)
        first = run(src, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert all(hashlib.sha256(row["image"]).hexdigest() == row["sha256"] for row in rows)
    stored = next(row["image"] for row in rows if row["source_path"].endswith(victim.name))
    assert stored == victim.read_bytes() and stored.endswith(b"changed")
    again = run(src, tmp_path / "out")  # the index holds the listing's stamp from before the rewrite
    assert again.skipped and again.manifest == first.manifest


def test_flow_gives_each_build_its_own_folder_and_a_b_a_returns_a(tmp_path: Path) -> None:
    """Two sources named `food`: each gets <workspace>/datasets/food-<fingerprint16>; A, B, A reuses A's."""
    from prefect.cache_policies import NO_CACHE

    from flows.pipeline_config import PipelineConfig
    from tasks.stages import ingest_stage

    # No Prefect cache: a cached result could name a folder that now holds another build.
    assert type(ingest_stage.cache_policy) is type(NO_CACHE)
    workspace = tmp_path / "ws"
    a = make_tree(tmp_path / "a" / "food", {c: 4 for c in CLASSES[:2]})
    b = make_tree(tmp_path / "b" / "food", {c: 4 for c in CLASSES[1:3]})

    def flow_ingest(src: Path) -> IngestResult:
        cfg = PipelineConfig(source=str(src), workspace=str(workspace)).ingest()
        return ingest_stage.fn(cfg.model_copy(update={"workers": 1}))

    first, second, again = flow_ingest(a), flow_ingest(b), flow_ingest(a)
    assert Path(first.out) == workspace.resolve() / "datasets" / f"food-{first.manifest['fingerprint'][:16]}"
    assert Path(second.out).name == f"food-{second.manifest['fingerprint'][:16]}" and second.out != first.out
    assert not first.skipped and not second.skipped
    assert again.skipped and again.out == first.out and again.manifest == first.manifest
    assert read_ingested_manifest(first.out) == first.manifest and read_ingested_manifest(first.out)["classes"] == CLASSES[:2]
    assert read_ingested_manifest(second.out)["classes"] == CLASSES[1:3]

    shutil.copy(sample_files(CLASSES[2], 1)[0], a / CLASSES[0] / "late.jpg")  # A grows: a new build
    grown = flow_ingest(a)
    assert not grown.skipped and grown.out not in (first.out, second.out)
    assert grown.manifest["rows_written"] == first.manifest["rows_written"] + 1
    assert read_ingested_manifest(first.out) == first.manifest


# --- bad input -----------------------------------------------------------------------------------

def _missing(tmp: Path) -> tuple[Path, Path]:
    return tmp / "nope", tmp / "out"


def _empty(tmp: Path) -> tuple[Path, Path]:
    (tmp / "src").mkdir()
    return tmp / "src", tmp / "out"


def _no_class_folders(tmp: Path) -> tuple[Path, Path]:
    (tmp / "src").mkdir()
    shutil.copy(sample_files(CLASSES[0], 1)[0], tmp / "src" / "loose.jpg")
    return tmp / "src", tmp / "out"


def _one_class(tmp: Path) -> tuple[Path, Path]:
    return make_tree(tmp / "src", {CLASSES[0]: 3}), tmp / "out"


def _split_without_train(tmp: Path) -> tuple[Path, Path]:
    return make_tree(tmp / "src", {c: 2 for c in CLASSES[:2]}, split="test"), tmp / "out"


def _mixed_layout(tmp: Path) -> tuple[Path, Path]:
    src = make_tree(tmp / "src", {c: 2 for c in CLASSES[:2]}, split="train")
    make_tree(src, {CLASSES[2]: 2})
    return src, tmp / "out"


def _foreign_output(tmp: Path) -> tuple[Path, Path]:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("precious")
    return make_tree(tmp / "src", {c: 3 for c in CLASSES[:2]}), tmp / "out"


@pytest.mark.parametrize("case, names, fragment", [
    (_missing, "src", "does not exist"),
    (_empty, "src", "is empty"),
    (_no_class_folders, "src", "no class folders"),
    (_one_class, "src", "only one class"),
    (_split_without_train, "src", "no train/"),
    (_mixed_layout, "src", "mixes split folders"),
    (_foreign_output, "out", "not a train-food dataset"),
])
def test_bad_input_exits_2_naming_the_path(tmp_path: Path, capsys, case, names: str, fragment: str) -> None:
    src, out = case(tmp_path)
    code = main(["ingest", str(src), "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("train-food ingest: error:") and fragment in err
    assert str(src if names == "src" else out) in err
    if case is _foreign_output:
        assert (out / "thesis.tex").read_text() == "precious"


def test_bad_option_value_exits_2_naming_the_option(tmp_path: Path, capsys) -> None:
    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    assert main(["ingest", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction" in capsys.readouterr().err


def test_read_manifest_rejects_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"classes": []}')
    with pytest.raises(UserInputError, match=str(tmp_path)):
        read_ingested_manifest(tmp_path)


# --- stored bytes and Parquet schema -------------------------------------------------------------

def test_max_side_reencodes_only_larger_images(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 3 for c in CLASSES[:2]})
    run(src, tmp_path / "small", max_side=64)
    for row in read_rows(tmp_path / "small"):
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (row["width"], row["height"]) and max(image.size) == 64
        assert row["sha256"] == _sha(src / row["source_path"])  # still identifies the source file
    for max_side in (None, 128):  # the sample's longest side is 128: nothing to shrink
        out = tmp_path / f"unchanged-{max_side}"
        run(src, out, max_side=max_side)
        assert all(row["image"] == (src / row["source_path"]).read_bytes() for row in read_rows(out))


def test_parquet_schema_columns_and_images_read_back(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 8 for c in CLASSES[:3]})
    manifest = run(src, tmp_path / "out", shard_rows=5).manifest
    assert manifest["schema_version"] == 1 and manifest["classes"] == CLASSES[:3]
    for split, shards in manifest["shards"].items():
        for i, shard in enumerate(shards):
            assert shard == f"{split}/part-{i:05d}.parquet"
            assert pq.read_schema(tmp_path / "out" / shard).equals(EXPECTED_SCHEMA, check_metadata=False)
            assert pq.read_metadata(tmp_path / "out" / shard).num_rows <= 5
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 24
    for row in rows:
        assert manifest["classes"][row["label"]] == row["class_name"]
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert row["image"] == (src / row["source_path"]).read_bytes()
        with Image.open(io.BytesIO(row["image"])) as image:
            image.load()
            assert image.size == (row["width"], row["height"])
    assert Counter(r["split"] for r in rows) == {s: sum(c.values()) for s, c in manifest["counts"].items()}


def test_shards_are_bounded_by_bytes(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {c: 10 for c in CLASSES[:2]})
    limit = 20_000  # a sample image is ~5 kB
    manifest = run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0, shard_bytes=limit).manifest
    sizes = [sum(len(b) for b in pq.read_table(tmp_path / "out" / s).column("image").to_pylist())
             for s in manifest["shards"]["train"]]
    assert len(sizes) > 1 and max(sizes) <= limit and sum(sizes) > limit
    # a split with no rows still gets one empty, typed shard
    assert manifest["shards"]["val"] == ["val/part-00000.parquet"]
    assert pq.read_table(tmp_path / "out" / "val/part-00000.parquet").num_rows == 0


def test_sample_is_committed_as_specified() -> None:
    files = sorted(SAMPLE.rglob("*.jpg"))
    assert len(CLASSES) == 10 and len(files) == 10 * (64 + 16)
    assert sum(f.stat().st_size for f in files) < 15 * 2**20
    assert (SAMPLE / "ATTRIBUTION.md").is_file()
    with Image.open(files[0]) as image:
        assert max(image.size) == 128
    assert os.path.basename(files[0].parent.parent) in ("train", "test")


def test_pool_worker_module_and_ingest_stay_free_of_heavy_imports() -> None:
    """Spawned decode workers must start fast, and tasks.ingest must stay Prefect-free."""
    import subprocess
    import sys

    code = ("import sys, tasks.ingest.decode; light = set(sys.modules); import tasks.ingest.pipeline; "
            "heavy = {'prefect', 'torch', 'ray', 'mlflow'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in light}), "
            "sorted(heavy & {m.split('.')[0] for m in sys.modules}), 'pyarrow' in light)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]", "False"]

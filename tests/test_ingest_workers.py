"""Ingestion's decode workers: a decoder that crashes or hangs on one file costs that file only
(quarantined, named), while running out of memory or spool disk fails the run in one line."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import misbehaving_decoder
import pytest
from test_ingest import CLASSES, assert_accounting, make_tree, sample_files

import tasks.ingest.pipeline as pipeline
from flows.cli.main import main
from ray_jobs.errors import UserInputError
from tasks.ingest.config import IngestConfig
from tasks.ingest.pipeline import ingest


@pytest.fixture
def misbehaving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "inspect_image", misbehaving_decoder.decode)


def _with(root: Path, *names: str) -> Path:
    """Two classes of 3 sample photos, plus copies of one photo under `names` in the first class."""
    make_tree(root, {name: 3 for name in CLASSES[:2]})
    for name in names:
        shutil.copy2(sample_files(CLASSES[0], 1)[0], root / CLASSES[0] / name)
    return root


def _reasons(manifest: dict) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in manifest["quarantine"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crashing_and_a_hanging_decoder_cost_only_their_files(tmp_path, misbehaving, workers):
    src = _with(tmp_path / "src", "crash.jpg", "hang.jpg")
    start = time.monotonic()
    manifest = ingest(IngestConfig(src=src, out=str(tmp_path / "out"), workers=workers, decode_timeout_s=3)).manifest
    assert time.monotonic() - start < 60
    reasons = _reasons(manifest)
    assert reasons[f"{CLASSES[0]}/crash.jpg"] == "decoder crashed (exit code 3)"
    assert reasons[f"{CLASSES[0]}/hang.jpg"] == "decoder timed out (over 3 s)"
    assert manifest["rows_written"] == 6
    assert_accounting(manifest)


@pytest.mark.parametrize(("name", "message"), [("oom.jpg", "out of memory"),
                                               ("nospace.jpg", "no space left for the decode spool")])
def test_running_out_of_memory_or_disk_fails_the_run_instead_of_quarantining(tmp_path, misbehaving, capsys, name,
                                                                              message):
    src = _with(tmp_path / "src", name)
    with pytest.raises(UserInputError, match=f"the machine ran out while decoding .*{name}: {message}"):
        ingest(IngestConfig(src=src, out=str(tmp_path / "out"), workers=2))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert main(["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # the progress bar, then one line
    assert err.splitlines()[-1].startswith("train-food ingest: error: ingest stopped, nothing written")

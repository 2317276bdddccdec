"""Ingestion under faults: a decoder that crashes or hangs on one file costs that file only
(quarantined, named); running out of memory or spool disk fails the run in one line; a SIGKILLed
run leaves nothing the next run does not clean; two runs of one build at once make one dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dies_in_a_child
import misbehaving_decoder
import pytest
from test_ingest import CLASSES, assert_accounting, make_tree, sample_files

import tasks.ingest.pipeline as pipeline
from flows.cli.main import main
from ray_jobs.errors import UserInputError
from tasks.ingest import workers
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


def test_the_files_after_a_crash_in_the_same_hand_out_are_still_decoded(tmp_path):
    """Jobs go out in chunks: the files a dead or stuck worker had not reached are handed out again."""
    photo = sample_files(CLASSES[0], 1)[0]
    names = [f"{i:03d}.jpg" for i in range(64)]
    names[9], names[18] = "crash-9.jpg", "hang-18.jpg"  # inside the second and the third chunk of 8
    for name in names:
        shutil.copy2(photo, tmp_path / name)
    jobs = [(i, str(tmp_path / name)) for i, name in enumerate(names)]
    assert len(jobs) // 8 == workers.MAX_CHUNK // 2  # one worker: chunks of 8 files
    start = time.monotonic()
    results = dict(workers.supervised_map(misbehaving_decoder.decode, jobs, 1, timeout_s=2))
    assert time.monotonic() - start < 2 + 5, "handed out again at once, not by the idle-pool fallback"
    assert sorted(job[0] for job in results) == list(range(64))
    failed = {job[1].rsplit("/", 1)[1]: result.error for job, result in results.items() if result.error}
    assert failed == {"crash-9.jpg": "decoder crashed (exit code 3)", "hang-18.jpg": "decoder timed out (over 2 s)"}


@pytest.mark.timeout(120)  # it hung before
def test_workers_that_die_before_taking_a_file_stop_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    """Nothing to blame on a file, so no file is quarantined, and no endless respawning."""
    src = _with(tmp_path / "src")
    monkeypatch.setattr(pipeline, "inspect_image", dies_in_a_child.decode)
    monkeypatch.setenv("TRAIN_FOOD_TEST_PARENT", str(os.getpid()))
    start = time.monotonic()
    code = main(["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "2"])
    assert time.monotonic() - start < 60
    assert code == 2 and not (tmp_path / "out").exists()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("train-food ingest: error: ingest stopped, nothing written: 6 decode workers in a row crashed "
                    "(exit code 7) before taking a file (their error output is above); check the installation "
                    "(`make install`) and run again")


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


# --- killed and concurrent runs (the real command, in subprocesses) ------------------------------

REPO = Path(__file__).resolve().parents[1]


def _ingest_command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli.main", "ingest", str(src), "--out", str(out), *extra]


def test_a_sigkilled_ingest_leaves_nothing_the_next_run_does_not_clean(tmp_path):
    src = make_tree(tmp_path / "src", {name: 40 for name in CLASSES[:4]})
    out = tmp_path / "out"
    first = subprocess.Popen(_ingest_command(src, out, "--workers", "2", "--max-side", "48"), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spools = Path(tempfile.gettempdir()).glob
    deadline = time.monotonic() + 60
    while not list(spools(f"train-food-ingest-{first.pid}-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(spools(f"train-food-ingest-{first.pid}-*")), "the ingest never started decoding"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert list(spools(f"train-food-ingest-{first.pid}-*"))  # the killed run's spool is left behind ...
    killed_tmp = tmp_path / f"out.tmp-{uuid.uuid4().hex}"  # as a run killed while writing its shards leaves it
    killed_tmp.mkdir()
    (killed_tmp / "part-00000.parquet").write_bytes(b"half a shard")
    second = subprocess.run(_ingest_command(src, out, "--workers", "2", "--max-side", "48"), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"cleaned up {killed_tmp}" in second.stdout
    assert not list(spools(f"train-food-ingest-{first.pid}-*"))  # ... and swept by the next one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_written"] == 160 and manifest["quarantined"] == 0


def test_two_ingests_of_one_build_at_once_make_one_dataset(tmp_path):
    src = make_tree(tmp_path / "src", {name: 40 for name in CLASSES[:4]})
    out = tmp_path / "out"
    runs = [subprocess.Popen(_ingest_command(src, out, "--workers", "1", "--max-side", "48"), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert [code for code, _, _ in results] == [0, 0], [err[-1000:] for _, _, err in results]
    outputs = sorted(stdout for _, stdout, _ in results)
    assert sum("waited for another ingest" in text and "is up to date" in text for text in outputs) == 1, outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_written"] == 160

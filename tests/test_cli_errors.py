"""Bad input through the installed console script: one line naming the problem, exit code 2, no traceback.

These run `train-food` as a user would (a subprocess), so whatever Ray, Prefect or Python print on
the way out is on the screen being checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("train-food"))
TINY_TRAIN = ["--image-size", "32", "--batch-size", "16", "--loader-workers", "0", "--feat-dim", "16",
              "--limit-per-split", "32"]


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, command: str, *expected: str) -> None:
    screen = done.stdout + done.stderr
    assert done.returncode == 2, screen[-3000:]
    assert "Traceback" not in screen, screen[-3000:]
    errors = [line for line in screen.splitlines() if line.startswith(f"train-food {command}: error:")]
    assert len(errors) == 1, screen[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]


def test_missing_dataset(tmp_path):
    done = run_cli("train", "--dataset", str(tmp_path / "nowhere"), "--workers", "0", cwd=tmp_path)
    assert_one_line_error(done, "train", "nowhere", "no manifest.json")


def test_manifest_that_does_not_match_the_checkpoint(trained_checkpoint, tiny_dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = ["tiramisu", *manifest["classes"][1:]]
    (other / "manifest.json").write_text(json.dumps(manifest))
    done = run_cli("evaluate", trained_checkpoint, "--dataset", str(other), "--reports", str(tmp_path / "r"),
                   cwd=tmp_path)
    assert_one_line_error(done, "evaluate", "class mismatch", "tiramisu")


def test_nan_loss(tiny_dataset, tmp_path):
    done = run_cli("train", "--dataset", tiny_dataset, "--workers", "0", "--epochs", "2", "--lr", "1e30",
                   "--storage-path", str(tmp_path / "runs"), *TINY_TRAIN, cwd=tmp_path)
    assert_one_line_error(done, "train", "loss became NaN/inf at epoch 1, step")


def test_unschedulable_request(tiny_dataset, tmp_path):
    done = run_cli("train", "--dataset", tiny_dataset, "--workers", "64", *TINY_TRAIN, cwd=tmp_path)
    assert_one_line_error(done, "train", "64 workers need 64 CPU")


@pytest.mark.slow
def test_the_flow_through_train_food_run(tmp_path):
    done = run_cli("run", "--source", str(tmp_path / "no-photos"), "--workspace", str(tmp_path / "ws"), cwd=tmp_path)
    assert_one_line_error(done, "run", "no-photos", "does not exist")
    assert "database is locked" not in done.stderr
    done = run_cli("run", "--image-size", "8", cwd=tmp_path)
    assert_one_line_error(done, "run", "--image-size")


@pytest.mark.slow
def test_a_successful_flow_run_prints_no_traceback_and_each_epoch_once(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address  # join the session's cluster: one Ray on the machine
    done = run_cli("run", "--workspace", str(tmp_path / "ws"), "--epochs", "2", "--workers", "1",
                   "--ray-address", address, "--image-size", "32", "--feat-dim", "16", "--max-side", "64",
                   "--limit-per-split", "16", "--loader-workers", "0", cwd=tmp_path, timeout=600)
    screen = done.stdout + done.stderr
    assert done.returncode == 0, screen[-3000:]
    assert "Traceback" not in screen, screen[-5000:]
    for epoch in (1, 2):
        lines = [line for line in screen.splitlines() if f"epoch {epoch}/2  loss" in line]
        assert len(lines) == 1, lines
    assert "test top-1" in done.stdout + done.stderr

"""Checkpoints: the last and the best one are among those that exist, pruning keeps what resuming needs, loading runs no code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from flows.cli.main import main
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import (
    best_checkpoint,
    checkpoint_dir_name,
    chosen_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    stored_checkpoints,
)


def _fake_run(run_dir: Path, scores: list[float]) -> None:
    for epoch, score in enumerate(scores, start=1):
        directory = run_dir / checkpoint_dir_name(epoch)
        directory.mkdir(parents=True)
        save_checkpoint(directory, {"epoch": epoch, "metrics": {"val_acc1": score, "epoch": epoch}})


def test_best_is_the_highest_score_that_still_exists_and_the_latest_among_equals(tmp_path):
    _fake_run(tmp_path, [0.5, 0.5, 0.3, 0.1])
    best = best_checkpoint(str(tmp_path))
    assert best is not None and best.epoch == 2 and best.score == 0.5, "among equal scores the latest wins"
    # Ray deletes the earliest of tied checkpoints; the rule must never name a deleted one.
    for child in (tmp_path / checkpoint_dir_name(2)).iterdir():
        child.unlink()
    (tmp_path / checkpoint_dir_name(2)).rmdir()
    assert best_checkpoint(str(tmp_path)).epoch == 1


def test_the_chosen_checkpoint_is_the_last_or_the_best_that_exists(tmp_path):
    _fake_run(tmp_path, [0.2, 0.9, 0.4])
    assert chosen_checkpoint(str(tmp_path), "last").epoch == 3
    assert chosen_checkpoint(str(tmp_path), "best_val").epoch == 2
    (tmp_path / checkpoint_dir_name(3) / "checkpoint.pt").unlink()  # the last one, half written
    assert chosen_checkpoint(str(tmp_path), "last").epoch == 2
    assert chosen_checkpoint(str(tmp_path / "missing"), "last") is None


def test_half_written_checkpoints_are_ignored(tmp_path):
    _fake_run(tmp_path, [0.2, 0.9])
    (tmp_path / checkpoint_dir_name(2) / "checkpoint.pt").unlink()  # a copy that never finished
    assert [c.epoch for c in stored_checkpoints(str(tmp_path))] == [1]
    assert best_checkpoint(str(tmp_path / "missing")) is None


def test_prune_keeps_the_best_k_and_the_latest(tmp_path):
    _fake_run(tmp_path, [0.1, 0.9, 0.2, 0.8, 0.05])
    prune_checkpoints(tmp_path, keep=2)
    assert [c.epoch for c in stored_checkpoints(str(tmp_path))] == [2, 4, 5]


class _Payload:
    """A pickle that runs a command when unpickled: what a crafted checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_and_never_runs(tmp_path, tiny_dataset):
    marker = tmp_path / "pwned"
    directory = tmp_path / "checkpoint_epoch_0001"
    directory.mkdir()
    torch.save({"model": _Payload(marker), "epoch": 1}, directory / "checkpoint.pt")
    with pytest.raises(UserInputError, match="not a train-food checkpoint that loads safely"):
        load_checkpoint(directory)
    assert main(["evaluate", str(directory), "--dataset", tiny_dataset, "--reports", str(tmp_path / "r")]) == 2
    (directory / "checkpoint.pt").write_bytes(pickle.dumps(_Payload(marker)))  # a bare pickle, not torch.save
    with pytest.raises(UserInputError):
        load_checkpoint(directory)
    assert not marker.exists(), "loading a checkpoint executed code from the file"


def test_a_real_checkpoint_loads_weights_only(trained_checkpoint):
    state = load_checkpoint(trained_checkpoint)
    assert len(state["dataset_fingerprint"]) == 64 and len(state["classes"]) == 10
    assert json.loads((Path(trained_checkpoint) / "metrics.json").read_text())["epoch"] == state["epoch"]

"""Self-describing training checkpoints, and finding the one a run hands on among those that still exist.

A checkpoint directory `checkpoint_epoch_NNNN/` holds:

- `checkpoint.pt`: the unwrapped model's weights, the optimizer, the scheduler, the objective's
  state (the center-loss centers), every rank's RNG state, the epoch, the metrics, the full config,
  the class names and the fingerprint of the dataset it trained on. Only tensors and plain values,
  so it loads with `torch.load(weights_only=True)`: loading never runs code from the file.
- `metrics.json`: the epoch's metrics again, small, so the best checkpoint of a run can be chosen
  by reading a few bytes per epoch instead of every model.

"Best" means the highest `val_acc1` among the checkpoints that exist on storage now (Ray deletes
the worst ones as it goes, the earliest among equals, but always keeps the latest), the latest epoch
among equals. The checkpoint a run hands on is its last or its best (`RunConfig.checkpoint_choice`).
Every mode (Ray workers, local mode, Tune trials) uses the same rule on the same files.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from ray_jobs.config import CheckpointChoice
from ray_jobs.errors import UserInputError
from ray_jobs.storage import absolute, filesystem, is_uri, join

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
DIR_PREFIX = "checkpoint_epoch_"
SCORE = "val_acc1"


def checkpoint_dir_name(epoch: int) -> str:
    return f"{DIR_PREFIX}{epoch:04d}"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `checkpoint.pt` (through a temporary file, so a crash leaves no half file) and `metrics.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    metrics = {key: value for key, value in (state.get("metrics") or {}).items() if isinstance(value, (int, float))}
    (directory / METRICS_FILE).write_text(json.dumps({"epoch": state.get("epoch"), **metrics}))
    return path


# What `torch.load(weights_only=True)` raises for a file that is not plain tensors and values.
UNSAFE_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)


def load_error_line(err: BaseException) -> str:
    """The informative line of a torch.load error, without torch's advice to retry with weights_only=False."""
    noise = ("weights only load failed", "weights_only", "please file an issue", "check the documentation")
    for line in str(err).splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line and not any(phrase in line.lower() for phrase in noise):
            return line
    return type(err).__name__


def load_checkpoint(directory_or_file: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint from its directory (as Ray stores it) or from the file itself.

    `weights_only=True`: a file that needs arbitrary unpickling (a crafted or foreign pickle) is
    refused with a `UserInputError` instead of being executed.
    """
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserInputError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except UNSAFE_LOAD_ERRORS as err:
        raise UserInputError(
            f"{path} is not a train-food checkpoint that loads safely (weights only): {load_error_line(err)}"
        ) from None
    if not isinstance(state, dict):
        raise UserInputError(f"{path} holds a {type(state).__name__}, not a train-food checkpoint")
    return state


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint directory found on storage and the metrics it was saved with."""

    path: str
    epoch: int
    metrics: dict[str, float]

    @property
    def score(self) -> float:
        value = self.metrics.get(SCORE)
        return float(value) if isinstance(value, (int, float)) else float("-inf")


def stored_checkpoints(run_dir: str) -> list[StoredCheckpoint]:
    """Complete checkpoints under one run directory (local path or pyarrow.fs URI), oldest first."""
    fs, root = filesystem(absolute(run_dir))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(DIR_PREFIX):
            continue
        files = {entry.base_name for entry in fs.get_file_info(pafs.FileSelector(info.path))}
        if not {CHECKPOINT_FILE, METRICS_FILE} <= files:
            continue  # being written, or half deleted
        with fs.open_input_stream(f"{info.path}/{METRICS_FILE}") as stream:
            metrics = json.loads(stream.read())
        path = join(run_dir, info.base_name) if is_uri(run_dir) else info.path
        found.append(StoredCheckpoint(path=path, epoch=int(metrics.get("epoch") or 0), metrics=metrics))
    return sorted(found, key=lambda checkpoint: checkpoint.epoch)


def best_checkpoint(run_dir: str) -> StoredCheckpoint | None:
    """The existing checkpoint with the highest `val_acc1` (the latest among equals); None if there is none."""
    return max(stored_checkpoints(run_dir), key=lambda c: (c.score, c.epoch), default=None)


def chosen_checkpoint(run_dir: str, choice: CheckpointChoice) -> StoredCheckpoint | None:
    """The checkpoint a run hands on: its last epoch's, or its best by val_acc1; None if there is none."""
    if choice == "best_val":
        return best_checkpoint(run_dir)
    found = stored_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the `keep` best checkpoints and the latest one (to resume from); Ray does this for its runs.

    Used in local mode, where Ray leaves the checkpoint directories to us.
    """
    found = stored_checkpoints(str(run_dir))
    if not found:
        return
    ranked = sorted(found, key=lambda c: (c.score, c.epoch), reverse=True)
    kept = {c.path for c in ranked[:keep]} | {found[-1].path}
    for checkpoint in found:
        if checkpoint.path not in kept:
            for child in Path(checkpoint.path).iterdir():
                child.unlink()
            Path(checkpoint.path).rmdir()

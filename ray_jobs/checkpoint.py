"""Self-describing training checkpoints: everything needed to resume, evaluate or serve.

One file, `checkpoint.pt`, holding the unwrapped model's weights, the optimizer, the scheduler,
the objective's state (the center-loss centers), the epoch, the metrics, the full config and
the class names, so a checkpoint can be loaded without any other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ray_jobs.errors import UserInputError

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/checkpoint.pt` through a temporary file, so a crash leaves no half file."""
    path = Path(directory) / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(directory_or_file: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint from its directory (as Ray stores it) or from the file itself."""
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserInputError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)

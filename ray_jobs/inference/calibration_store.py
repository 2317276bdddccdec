"""Where an open-set calibration lives: `calibration.json` next to `checkpoint.pt`, and in a registered model's folder.

A separate small JSON file rather than a key inside `checkpoint.pt`: calibrating happens after
training (the checkpoint is never rewritten), the file is plain numbers that load without
running any code, and registration copies it into the model folder unchanged. The document names
the checkpoint epoch and classes it was made for, so a file that does not belong to the model
next to it is refused instead of silently used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray_jobs.errors import UserInputError
from ray_jobs.inference.open_set import Calibration

CALIBRATION_FILE = "calibration.json"
FORMAT = "train-food-open-set/1"


def calibration_path(checkpoint_or_folder: str | Path) -> Path:
    """`calibration.json` in a checkpoint's folder (given the folder or its `checkpoint.pt`) or a model folder."""
    path = Path(checkpoint_or_folder)
    return (path if path.is_dir() else path.parent) / CALIBRATION_FILE


def calibration_document(calibration: Calibration, classes: list[str], epoch: int | None,
                         dataset_fingerprint: str) -> dict[str, Any]:
    """What the file holds: the calibration plus what it was made for."""
    return {"format": FORMAT, "classes": list(classes), "checkpoint_epoch": epoch,
            "dataset_fingerprint": dataset_fingerprint, "calibration": calibration.to_dict()}


def write_calibration(folder: str | Path, document: dict[str, Any]) -> Path:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path = calibration_path(folder)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)
    return path


def read_calibration(folder: str | Path, classes: list[str], feat_dim: int,
                     epoch: int | None = None) -> Calibration | None:
    """The calibration stored in `folder` for this model, None when there is none.

    `UserInputError` (one line, naming the file) for a file that is unreadable, malformed or made
    for other classes, feature width or checkpoint epoch (when `epoch` is given).
    """
    path = calibration_path(folder)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        if document.get("classes") != list(classes):
            raise ValueError("made for other classes than the model's")
        if epoch is not None and document.get("checkpoint_epoch") != epoch:
            raise ValueError(f"made for epoch {document.get('checkpoint_epoch')}, the checkpoint is epoch {epoch}")
        calibration = Calibration.from_dict(document["calibration"])
        calibration.check(num_classes=len(classes), feat_dim=feat_dim)
    except OSError as err:
        raise UserInputError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise UserInputError(f"{path}: unusable open-set calibration ({err})") from None
    return calibration

"""Where an open-set calibration lives: `calibration.json` (+ `calibration.safetensors`) next to
`checkpoint.pt`, and in a registered model's folder.

Separate small files rather than keys inside `checkpoint.pt`: calibrating happens after training
(the checkpoint is never rewritten), neither file runs code when read (JSON and safetensors), and
registration copies them into the model folder unchanged. The JSON names the checkpoint epoch and
classes it was made for, so a file that does not belong to the model next to it is refused
instead of silently used, and the SHA-256 of the tensor file, so the JSON's own hash (which
evaluation reports and registration checks) pins both.

Formats: `train-food-open-set/2` (detectors, `ray_jobs.inference.open_set`), and the older
`train-food-open-set/1` (per-class distance thresholds, `ray_jobs.inference.legacy_calibration`),
still read. A /2 document holds the fp32 calibration under `calibration` and one per other
precision offered (`ray_jobs.inference.precision`) under `by_precision`, their tensors in the same
file with the precision as a key prefix (`bf16:energy/...`); one made before that holds fp32 only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ray_jobs.errors import UserInputError
from ray_jobs.inference.legacy_calibration import LegacyCalibration
from ray_jobs.inference.open_set import OpenSetCalibration

CALIBRATION_FILE = "calibration.json"
TENSORS_FILE = "calibration.safetensors"
FORMAT = "train-food-open-set/2"
LEGACY_FORMAT = "train-food-open-set/1"

AnyCalibration = OpenSetCalibration | LegacyCalibration


def calibration_path(checkpoint_or_folder: str | Path) -> Path:
    """`calibration.json` in a checkpoint's folder (given the folder or its `checkpoint.pt`) or a model folder."""
    path = Path(checkpoint_or_folder)
    return (path if path.is_dir() else path.parent) / CALIBRATION_FILE


def calibration_files(checkpoint_or_folder: str | Path) -> list[Path]:
    """The files a calibration consists of that exist there (what registration copies)."""
    json_path = calibration_path(checkpoint_or_folder)
    return [path for path in (json_path, json_path.with_name(TENSORS_FILE)) if path.is_file()]


def _prefix(precision: str) -> str:
    return "" if precision == "fp32" else f"{precision}:"


def write_calibration(folder: str | Path, calibrations: dict[str, OpenSetCalibration], classes: list[str],
                      epoch: int | None, dataset_fingerprint: str) -> Path:
    """One calibration per precision (fp32 among them), the tensors first, then the JSON naming their
    hash, each through a temporary file and a rename, so a reader never sees half a file nor a JSON
    without its tensors."""
    from safetensors.torch import save

    path = calibration_path(folder)
    tensors = {f"{_prefix(precision)}{key}": value for precision, calibration in calibrations.items()
               for key, value in calibration.tensors().items()}
    data = save(tensors)
    _replace(path.with_name(TENSORS_FILE), data)
    document = {"format": FORMAT, "classes": list(classes), "checkpoint_epoch": epoch,
                "dataset_fingerprint": dataset_fingerprint, "tensors": TENSORS_FILE,
                "tensors_sha256": hashlib.sha256(data).hexdigest(), "calibration": calibrations["fp32"].metadata(),
                "by_precision": {precision: calibration.metadata() for precision, calibration in calibrations.items()
                                 if precision != "fp32"}}
    _replace(path, json.dumps(document, indent=1).encode())
    return path


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_calibration(folder: str | Path, classes: list[str], feat_dim: int,
                     epoch: int | None = None) -> AnyCalibration | None:
    """The fp32 calibration stored in `folder` for this model, None when there is none."""
    return read_calibrations(folder, classes, feat_dim, epoch).get("fp32")


def read_calibrations(folder: str | Path, classes: list[str], feat_dim: int,
                      epoch: int | None = None) -> dict[str, AnyCalibration]:
    """The calibrations stored in `folder` for this model, by precision (empty when there is none).

    `UserInputError` (one line, naming the file) for a file that is unreadable, malformed or made
    for other classes, feature width or checkpoint epoch (when `epoch` is given).
    """
    path = calibration_path(folder)
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or document.get("format") not in (FORMAT, LEGACY_FORMAT):
            raise ValueError(f"not a {FORMAT} or {LEGACY_FORMAT} document")
        if document.get("classes") != list(classes):
            raise ValueError("made for other classes than the model's")
        if epoch is not None and document.get("checkpoint_epoch") != epoch:
            raise ValueError(f"made for epoch {document.get('checkpoint_epoch')}, the checkpoint is epoch {epoch}")
        if document["format"] == LEGACY_FORMAT:
            legacy = LegacyCalibration.from_dict(document["calibration"])
            legacy.check(num_classes=len(classes), feat_dim=feat_dim)
            return {"fp32": legacy}
        tensors = _tensors(path, document)
        metadata = {"fp32": document["calibration"], **document.get("by_precision", {})}
        calibrations: dict[str, AnyCalibration] = {}
        for precision, entry in metadata.items():
            prefix = _prefix(precision)
            own = {key[len(prefix):]: value for key, value in tensors.items()
                   if key.startswith(prefix) and (prefix or ":" not in key)}
            calibration = OpenSetCalibration.from_parts(entry, own)
            if calibration.precision != precision:
                raise ValueError(f"its {precision} entry was made in {calibration.precision}")
            calibration.check(num_classes=len(classes), feat_dim=feat_dim)
            calibrations[precision] = calibration
    except OSError as err:
        raise UserInputError(f"cannot read {err.filename or path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # json.JSONDecodeError is a ValueError
        raise UserInputError(f"{path}: unusable open-set calibration ({err})") from None
    return calibrations


def _tensors(path: Path, document: dict[str, Any]) -> dict[str, Any]:
    """The tensor file the document names, refused unless its hash matches."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    tensors_path = path.with_name(TENSORS_FILE)
    if document.get("tensors") != TENSORS_FILE:
        raise ValueError(f"names tensor file {document.get('tensors')!r}, expected {TENSORS_FILE}")
    data = tensors_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != document.get("tensors_sha256"):
        raise ValueError(f"{TENSORS_FILE} does not match the hash the calibration names (changed or replaced)")
    try:
        return load(data)
    except SafetensorError as err:
        raise ValueError(f"unreadable {TENSORS_FILE} ({err})") from None

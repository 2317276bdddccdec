"""The evaluation's contract: what `evaluate` is asked (`EvaluateConfig`) and what report.json holds.

Registration reads reports back with `load_report`; the champion rule reads the lineage fields
(dataset fingerprint, test-split digest, complete split, classes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_jobs.dataset_format import Split
from ray_jobs.errors import UserInputError
from ray_jobs.inference.detector_names import DetectorName
from ray_jobs.inference.open_set import DEFAULT_ACCEPT_SHARE

REPORT_FILE = "report.json"
FILES = {
    "confusion_matrix_csv": "confusion_matrix.csv",
    "confusion_matrix_png": "confusion_matrix.png",
    "projection_png": "projection.png",
    "per_image_csv": "per_image.csv",
}


class _Frozen(BaseModel):
    # NaN metrics (e.g. compactness with one class present) round-trip as JSON NaN constants.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class EvaluateConfig(_Frozen):
    """What to evaluate, on which data, and where the report goes. Defaults live here only."""

    checkpoint: str = Field(description="Checkpoint directory (as Ray stores it) or checkpoint.pt file.")
    dataset: str = Field(description="Dataset written by `train-food ingest` (folder or pyarrow.fs URI).")
    reports: str = Field(description="Local folder for report.json and the figures (created if missing).")
    split: Split = Field(default="test", description="Split to evaluate.")
    batch_size: int = Field(default=64, ge=1, description="Images per inference batch.")
    loader_workers: int = Field(default=0, ge=0, description="DataLoader processes decoding images.")
    limit: int | None = Field(default=None, ge=1, description="Smoke-test switch: only the first N images.")
    cross_dataset: bool = Field(
        default=False,
        description="Allow a dataset other than the one the checkpoint was trained on (the report says so).",
    )
    device: str | None = Field(default=None, description="torch device; None = cuda if available, else cpu.")
    accept_share: float = Field(
        default=DEFAULT_ACCEPT_SHARE, gt=0.0, le=1.0,
        description="Open set: share of known val images each detector's threshold accepts.",
    )
    detector: DetectorName | None = Field(
        default=None, description="Open set: the detector the report judges with; None: the calibration's default."
    )


class ClassMetrics(_Frozen):
    """One row of the per-class table (sklearn's definitions, 0 where a denominator is 0)."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


class OpenSetSummary(_Frozen):
    """How the calibration next to the checkpoint judged the scored images (unknown = score below the threshold)."""

    calibration_sha256: str  # of calibration.json as used (it names its tensor file's hash): registration carries it
    accept_share: float
    detector: str  # the detector that judged
    description: str  # what it is and how its threshold was set, in words
    detectors: list[str]  # every detector the calibration holds
    accepted: int  # scored images at or above the threshold
    accepted_share: float


class EvaluationReport(_Frozen):
    """The content of report.json. `reports_dir` is where it was read from (or written to)."""

    checkpoint: str
    checkpoint_epoch: int | None
    train_run: str | None
    dataset: str
    dataset_fingerprint: str
    test_split_digest: str | None = None  # of the dataset's test rows and classes (None: reports before it existed)
    train_dataset_fingerprint: str  # of the dataset the checkpoint was trained on ("" for old checkpoints)
    cross_dataset: bool  # True only when the user asked to evaluate on another dataset
    split: str
    limit: int | None
    split_rows: int  # rows in the evaluated split; fewer images scored means a partial evaluation
    image_size: int
    classes: list[str]
    counts: dict[str, int]
    metrics: dict[str, float]
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]
    projection: dict[str, Any]
    open_set: OpenSetSummary | None = None  # None: the checkpoint has no calibration (see module docstring)
    checkpoint_metrics: dict[str, float]
    train_config: dict[str, Any]
    files: dict[str, str]
    sha256: dict[str, str]
    created_at: str
    reports_dir: str

    @property
    def path(self) -> Path:
        """Where report.json is."""
        return Path(self.reports_dir) / REPORT_FILE

    def file(self, role: str) -> Path:
        """Absolute path of one of `files` (e.g. "confusion_matrix_png")."""
        return Path(self.reports_dir) / self.files[role]

    @property
    def complete(self) -> bool:
        """Every image of the split was scored (no `--limit` cut)."""
        return self.counts["images"] == self.split_rows

    def images(self) -> dict[str, Path]:
        """The PNG figures by role, for artifacts."""
        return {role: self.file(role) for role, name in self.files.items() if name.endswith(".png")}


def load_report(path: str | Path) -> EvaluationReport:
    """Read report.json (or the folder holding it); `reports_dir` follows the file if it was moved."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        report = EvaluationReport.model_validate_json(path.read_bytes())
    except OSError as err:
        raise UserInputError(f"cannot read evaluation report {path}: {err.strerror or err}") from None
    except ValidationError as err:
        raise UserInputError(f"{path} is not a train-food evaluation report: {err.errors()[0]['msg']}") from None
    return report.model_copy(update={"reports_dir": str(path.resolve().parent)})

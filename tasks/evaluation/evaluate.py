"""Evaluate a training checkpoint on one split: metrics, per-class table, confusion matrix, projection.

Plain functions (no Prefect import): the flow wraps `evaluate_checkpoint` as a task and turns the
PNGs into artifacts. Everything lands in one reports directory:

    report.json               metrics, per-class table, open-set summary, file names (+ sha256), lineage
    confusion_matrix.csv      counts, class names as header and index (rows = true class)
    confusion_matrix.png      the same, labelled and annotated
    projection.png            2-D PCA of the split's features, coloured by class
    per_image.csv             per image: label, prediction, open-set detector, score, threshold, unknown

Open set: before scoring, the checkpoint gets an open-set calibration (`ray_jobs.inference.calibrate`:
every detector fit on the eval-mode train features of its own dataset and thresholded on its val
split, stored as `calibration.json` + `calibration.safetensors` next to the checkpoint) unless it
already has a current one with the same `accept_share`. The report says which detector judged
(`detector`, else the calibration's default) and which share of the scored images it accepts as
known dishes. A cross-dataset evaluation
never calibrates (its val split is not the model's); it uses an existing calibration or none.

Files are staged in a hidden temp folder and renamed into place with report.json last (and any
older report.json removed first), so a report.json on disk always matches the files next to it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.dataset_format import dataset_info, digest_of_test_split, read_manifest
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibrate import calibrate_checkpoint
from ray_jobs.inference.calibration_store import AnyCalibration, calibration_path, read_calibration
from ray_jobs.inference.loading import CheckpointModel, default_device, model_from_checkpoint
from ray_jobs.model.inputs import eval_preprocessing, input_spec
from ray_jobs.inference.verdicts import Verdicts
from ray_jobs.storage import absolute, local_checkpoint
from ray_jobs.training.engine import predict
from tasks.evaluation.plots import plot_confusion_matrix, plot_projection
from tasks.evaluation.report import FILES, REPORT_FILE, EvaluateConfig, EvaluationReport, OpenSetSummary
from tasks.evaluation.summary import pca_2d, summarize


def _check_classes(checkpoint: str, checkpoint_classes: list[str], dataset: str, dataset_classes: list[str]) -> None:
    if checkpoint_classes == dataset_classes:
        return
    only_ckpt = sorted(set(checkpoint_classes) - set(dataset_classes))
    only_data = sorted(set(dataset_classes) - set(checkpoint_classes))
    detail = (f"only in the checkpoint: {only_ckpt}; only in the dataset: {only_data}"
              if only_ckpt or only_data else "same names in a different order (labels would be scrambled)")
    raise UserInputError(
        f"class mismatch: checkpoint {checkpoint} was trained on {len(checkpoint_classes)} classes "
        f"{checkpoint_classes}, dataset {dataset} has {len(dataset_classes)} classes {dataset_classes}; {detail}"
    )


def _check_dataset(checkpoint: str, trained_on: str, dataset: str, fingerprint: str, cross_dataset: bool) -> None:
    """Refuse to score a checkpoint on a dataset build other than its own unless the user asked to."""
    if trained_on == fingerprint or cross_dataset:
        return
    trained = trained_on[:12] or "an unrecorded dataset"
    raise UserInputError(
        f"checkpoint {checkpoint} was trained on dataset {trained}, but {dataset} is dataset {fingerprint[:12]}: "
        "its test split may hold images the model trained on; pass --cross-dataset to evaluate anyway"
    )


def _train_run(checkpoint: Path, configured: str | None) -> str | None:
    """The training run's name: from the config, else the folder above `checkpoint_epoch_NNNN`."""
    if configured:
        return configured
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return directory.parent.name or None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_csv(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, matrix.tolist(), strict=True):
            writer.writerow([name, *row])


def _write_per_image_csv(logits: Tensor, labels: Tensor, classes: list[str], verdicts: Verdicts | None,
                         path: Path) -> None:
    """One row per scored image (`row` = its index in the split); open-set columns empty without a calibration."""
    probability, predicted = logits.float().softmax(dim=1).max(dim=1)
    if verdicts is None:
        open_set = [["", "", "", ""]] * len(labels)
    else:
        open_set = [[verdicts.detector, f"{score:.6f}", f"{threshold:.6f}", str(unknown).lower()]
                    for score, threshold, unknown in zip(verdicts.score.tolist(), verdicts.threshold.tolist(),
                                                         verdicts.unknown.tolist(), strict=True)]
    rows = zip(labels.tolist(), predicted.tolist(), probability.tolist(), open_set, strict=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", "predicted", "probability", "detector", "score", "threshold", "unknown"])
        for row, (label, guess, prob, cells) in enumerate(rows):
            writer.writerow([row, classes[label], classes[guess], f"{prob:.6f}", *cells])


def _calibration(cfg: EvaluateConfig, checkpoint: Path, loaded: CheckpointModel, dataset: str, own_dataset: bool,
                 val_rows: int, device: torch.device) -> AnyCalibration | None:
    """The calibration at `cfg.accept_share`: the stored one if current, else a new one from the train and val splits.

    Another dataset's val split says nothing about this model's classes, so a cross-dataset
    evaluation takes the stored calibration as it is (or none).
    """
    stored = read_calibration(checkpoint, loaded.classes, loaded.config.model.feat_dim, loaded.state.get("epoch"))
    if not own_dataset or val_rows == 0:
        return stored
    if stored is not None and not stored.older and stored.accept_share == cfg.accept_share:
        return stored
    return calibrate_checkpoint(checkpoint, dataset, cfg.accept_share, cfg.batch_size, cfg.loader_workers, device,
                                loaded=loaded)


def _open_set_summary(checkpoint: Path, calibration: AnyCalibration, verdicts: Verdicts) -> OpenSetSummary:
    accepted = int((~verdicts.unknown).sum())
    return OpenSetSummary(
        calibration_sha256=_sha256(calibration_path(checkpoint)),
        accept_share=calibration.accept_share,
        detector=verdicts.detector,
        description=calibration.describe(verdicts.detector),
        detectors=list(calibration.detector_names),
        accepted=accepted,
        accepted_share=accepted / max(len(verdicts.unknown), 1),
    )


def _verdicts(cfg: EvaluateConfig, calibration: AnyCalibration | None, features: torch.Tensor,
              logits: torch.Tensor) -> Verdicts | None:
    """The open-set verdicts of `cfg.detector` (None: the calibration's default); refused in one line if it lacks it."""
    if calibration is None:
        if cfg.detector is not None:
            raise UserInputError(f"--detector {cfg.detector}: {cfg.checkpoint} has no open-set calibration and its "
                                 "dataset no val split to make one")
        return None
    try:
        return calibration.judge(features, logits, cfg.detector)
    except ValueError as err:
        raise UserInputError(f"--detector {cfg.detector}: the calibration of {cfg.checkpoint} {err}") from None


def evaluate_checkpoint(cfg: EvaluateConfig) -> EvaluationReport:
    """Evaluate `cfg.checkpoint` on `cfg.split` of `cfg.dataset` and write the report folder."""
    device = torch.device(cfg.device) if cfg.device else default_device()
    checkpoint = local_checkpoint(cfg.checkpoint, cache=Path(cfg.reports).resolve() / "checkpoint")
    dataset = absolute(cfg.dataset)
    loaded = model_from_checkpoint(checkpoint, device)
    info = dataset_info(dataset, required_splits=(cfg.split,))
    _check_classes(str(checkpoint), loaded.classes, dataset, info.classes)
    trained_on = str(loaded.state.get("dataset_fingerprint", ""))
    _check_dataset(str(checkpoint), trained_on, dataset, info.fingerprint, cfg.cross_dataset)

    image_size = input_spec(loaded.config).image_size
    split = ParquetImageDataset(dataset, cfg.split, eval_preprocessing(loaded.config), cfg.limit)
    loader = DataLoader(split, batch_size=cfg.batch_size, num_workers=cfg.loader_workers)
    features, logits, labels = predict(loaded.net, loader, device)
    metrics, per_class, matrix = summarize(features, logits, labels, loaded.classes, prefix=cfg.split)
    points, explained = pca_2d(features)
    calibration = _calibration(cfg, checkpoint, loaded, dataset, trained_on == info.fingerprint,
                               info.rows.get("val", 0), device)
    verdicts = _verdicts(cfg, calibration, features, logits)
    open_set = _open_set_summary(checkpoint, calibration, verdicts) if verdicts is not None else None
    if open_set is not None:
        metrics[f"{cfg.split}_accepted_share"] = open_set.accepted_share

    reports = Path(cfg.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=reports))
    try:
        title = f"{cfg.split} split, {len(labels)} images, top-1 {metrics[f'{cfg.split}_acc1']:.3f}"
        _write_csv(matrix, loaded.classes, staging / FILES["confusion_matrix_csv"])
        _write_per_image_csv(logits, labels, loaded.classes, verdicts, staging / FILES["per_image_csv"])
        plot_confusion_matrix(
            matrix, loaded.classes, staging / FILES["confusion_matrix_png"], f"Confusion matrix: {title}"
        )
        plot_projection(
            points, labels.numpy(), loaded.classes, staging / FILES["projection_png"],
            f"PCA of {loaded.config.model.feat_dim}-d features: {cfg.split} split",
            (f"PC1 ({explained[0]:.0%} of variance)", f"PC2 ({explained[-1]:.0%} of variance)"),
        )
        state = loaded.state
        report = EvaluationReport(
            checkpoint=str(checkpoint),
            checkpoint_epoch=state.get("epoch"),
            train_run=_train_run(checkpoint, loaded.config.run.name),
            dataset=dataset,
            dataset_fingerprint=info.fingerprint,
            test_split_digest=digest_of_test_split(dataset, read_manifest(dataset)) if cfg.split == "test" else None,
            train_dataset_fingerprint=trained_on,
            cross_dataset=trained_on != info.fingerprint,
            split=cfg.split,
            limit=cfg.limit,
            split_rows=info.rows[cfg.split],
            image_size=image_size,
            classes=loaded.classes,
            counts={
                "images": len(labels),
                "classes": len(loaded.classes),
                "classes_present": int((matrix.sum(axis=1) > 0).sum()),
                "top1_correct": int(np.trace(matrix)),
            },
            metrics=metrics,
            per_class=per_class,
            confusion_matrix=matrix.tolist(),
            projection={"method": "pca", "explained_variance_ratio": explained},
            open_set=open_set,
            checkpoint_metrics={
                k: float(v) for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))
            },
            train_config=state["config"],
            files=dict(FILES),
            sha256={role: _sha256(staging / name) for role, name in FILES.items()},
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            reports_dir=str(reports),
        )
        (reports / REPORT_FILE).unlink(missing_ok=True)  # never leave an old report next to new files
        for name in FILES.values():
            os.replace(staging / name, reports / name)
        (staging / REPORT_FILE).write_text(report.model_dump_json(indent=2))
        os.replace(staging / REPORT_FILE, reports / REPORT_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report

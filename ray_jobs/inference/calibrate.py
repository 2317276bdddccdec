"""Calibrate a trained checkpoint for open-set rejection on its dataset, and store the result.

Runs after training, on the checkpoint that will be evaluated and registered (`tasks.evaluation.evaluate`
calls it), so every feature comes from the kept model (the EMA of the weights when one was kept):
the detectors are fit on its eval-mode train features (the eval preprocessing, no augmentation)
and thresholded on its val features (`ray_jobs.inference.open_set`), once for each precision a
model may be served in (`ray_jobs.inference.precision.OFFERED`: fp32 and the bf16 autocast
forward), each from that precision's own forward. The trained centers serve training and resume
only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibration_store import write_calibration
from ray_jobs.inference.detectors import DETECTORS, FitData
from ray_jobs.inference.loading import CheckpointModel, default_device, model_from_checkpoint
from ray_jobs.inference.open_set import DEFAULT_ACCEPT_SHARE, OpenSetCalibration, fit_open_set
from ray_jobs.inference.precision import OFFERED
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.training.engine import Precision, predict

FIT_PHOTOS_PER_CLASS = 200  # bounds the stored KNN bank (photos x feature width, float32) on large datasets


def fit_subset(labels: Tensor, per_class: int = FIT_PHOTOS_PER_CLASS, seed: int = 0) -> list[int]:
    """Row indices of at most `per_class` photos of each class, drawn with a fixed seed, in row order."""
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in labels.unique().tolist():
        rows = torch.nonzero(labels == label).flatten()
        chosen += rows[torch.randperm(len(rows), generator=generator)[:per_class]].tolist()
    return sorted(chosen)


def calibrate_checkpoint(
    checkpoint: str | Path,
    dataset: str,
    accept_share: float = DEFAULT_ACCEPT_SHARE,
    batch_size: int = 64,
    loader_workers: int = 0,
    device: str | torch.device | None = None,
    loaded: CheckpointModel | None = None,
) -> OpenSetCalibration:
    """Fit every detector on the train split of `dataset`, threshold them on its val split, in each
    precision offered, and write the calibrations next to the checkpoint; returns the fp32 one.

    `dataset` must be the build the checkpoint trained on (the caller checks); `loaded` saves
    rebuilding a model the caller already has.
    """
    device = torch.device(device) if device else default_device()
    loaded = loaded or model_from_checkpoint(checkpoint, device)
    preprocess = eval_preprocessing(loaded.config)
    train = ParquetImageDataset(dataset, "train", preprocess)
    fit_rows = Subset(train, fit_subset(train.labels))
    val = ParquetImageDataset(dataset, "val", preprocess)
    head = loaded.net.head
    linear = isinstance(head, nn.Linear)  # ViM needs the linear head that makes the logits (L-GM has none)
    names = tuple(name for name in DETECTORS if linear or name != "vim")
    head_weight = head.weight.detach().float().cpu() if linear else None
    head_bias = head.bias.detach().float().cpu() if linear else None

    def run(split: ParquetImageDataset | Subset, precision: Precision) -> tuple[Tensor, Tensor, Tensor]:
        return predict(loaded.net, DataLoader(split, batch_size=batch_size, num_workers=loader_workers), device,
                       precision)

    calibrations = {}
    for name in OFFERED:
        precision = Precision(device, name)
        train_features, train_logits, train_labels = run(fit_rows, precision)
        val_features, val_logits, val_labels = run(val, precision)
        fit = FitData(train_features, train_logits, train_labels, head_weight=head_weight, head_bias=head_bias)
        try:
            calibration = fit_open_set(fit, val_features, val_logits, val_labels, accept_share, names=names)
        except ValueError as err:
            raise UserInputError(f"cannot calibrate {checkpoint} for open-set rejection on {dataset}: {err}") from None
        calibrations[name] = replace(calibration, precision=name)
    write_calibration(Path(checkpoint), calibrations, loaded.classes, loaded.state.get("epoch"),
                      str(loaded.state.get("dataset_fingerprint", "")))
    return calibrations["fp32"]


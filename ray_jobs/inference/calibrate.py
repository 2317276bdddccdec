"""Calibrate a trained checkpoint for open-set rejection on its dataset's val split, and store the result.

Runs after training, on the checkpoint that will be evaluated and registered (`tasks.evaluation.evaluate`
calls it): val features come from the same eval path as evaluation (`engine.predict` on the
eval preprocessing), the centers from what the loss trained (see `ray_jobs.inference.open_set`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibration_store import calibration_document, write_calibration
from ray_jobs.inference.loading import CheckpointModel, default_device, model_from_checkpoint
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.inference.open_set import DEFAULT_ACCEPT_SHARE, DEFAULT_DISTANCE, Calibration, calibrate, class_means
from ray_jobs.training.engine import predict


def model_centers(loaded: CheckpointModel, val_features: Tensor, val_labels: Tensor) -> tuple[Tensor, str]:
    """The class centers the loss trained, and their kind: center-loss centers, L-GM means, else val means.

    With an EMA of the weights kept, the trained centers followed the live model's features, not the
    kept model's: the centers then come from the kept model's own val features, never a mix of the two.
    """
    kind = loaded.config.loss.kind
    if kind in ("center", "contrastive_center") and loaded.config.optim.ema_decay is None:
        try:
            return loaded.state["objective"]["centers"].float(), "center_loss"
        except (KeyError, TypeError, AttributeError):
            raise UserInputError("center-loss checkpoint holds no centers in its objective state") from None
    if kind == "lgm":
        return loaded.net.head.means.detach().float().cpu(), "lgm_means"
    return class_means(val_features, val_labels, len(loaded.classes)), "val_means"


def calibrate_checkpoint(
    checkpoint: str | Path,
    dataset: str,
    accept_share: float = DEFAULT_ACCEPT_SHARE,
    distance: str = DEFAULT_DISTANCE,
    batch_size: int = 64,
    loader_workers: int = 0,
    device: str | torch.device | None = None,
    loaded: CheckpointModel | None = None,
) -> Calibration:
    """Thresholds from the whole val split of `dataset`, written as `calibration.json` next to the checkpoint.

    `dataset` must be the build the checkpoint trained on (the caller checks); `loaded` saves
    rebuilding a model the caller already has.
    """
    device = torch.device(device) if device else default_device()
    loaded = loaded or model_from_checkpoint(checkpoint, device)
    split = ParquetImageDataset(dataset, "val", eval_preprocessing(loaded.config))
    features, _, labels = predict(loaded.net, DataLoader(split, batch_size=batch_size, num_workers=loader_workers),
                                  device)
    centers, kind = model_centers(loaded, features, labels)
    calibration = calibrate(features, centers, kind, accept_share, distance)
    document = calibration_document(calibration, loaded.classes, loaded.state.get("epoch"),
                                    str(loaded.state.get("dataset_fingerprint", "")))
    write_calibration(Path(checkpoint), document)
    return calibration

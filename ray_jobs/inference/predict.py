"""Batched inference: decoded images in, top-k classes and the open-set verdict out.

`predict_tensors` serves callers that decode themselves (a Ray Serve replica reading request
bodies); `predict_files` reads and decodes files first (`ray_jobs.data.decode`) and reports
unreadable ones instead of raising. Without a calibration, predictions carry no distance and
nothing is flagged unknown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ray_jobs.data.decode import read_image
from ray_jobs.errors import UserInputError
from ray_jobs.inference.loading import LoadedModel
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.inference.open_set import open_set_scores


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first, and the open-set verdict.

    `nearest`, `distance` and `threshold` are None when the model has no calibration; `unknown` is
    then always False.
    """

    path: str
    top: list[tuple[str, float]]
    unknown: bool = False  # farther from the nearest class center than that class's threshold
    nearest: str | None = None  # class whose center is nearest to the image's features
    distance: float | None = None  # distance to that center (the calibration's: relative by default)
    threshold: float | None = None  # that class's calibrated threshold


@dataclass(frozen=True)
class PredictionFailure:
    path: str
    error: str


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise UserInputError(f"--top-k must be at least 1, got {top_k}")


def _verdicts(model: LoadedModel, features: Tensor, count: int) -> list[dict[str, Any]]:
    """Prediction's open-set fields per image (none without a calibration)."""
    if model.calibration is None:
        return [{}] * count
    scores = open_set_scores(features, model.calibration)
    return [
        {"unknown": unknown, "nearest": model.classes[nearest], "distance": distance, "threshold": threshold}
        for nearest, distance, threshold, unknown in zip(scores.nearest.tolist(), scores.distance.tolist(),
                                                         scores.threshold.tolist(), scores.unknown.tolist(), strict=True)
    ]


@torch.no_grad()
def predict_tensors(
    model: LoadedModel, images: Sequence[Tensor], names: Sequence[str] | None = None, top_k: int = 5,
    batch_size: int = 32,
) -> list[Prediction]:
    """Predictions for already-decoded images (uint8 RGB CHW, any size, as `read_image` returns them),
    `batch_size` images per forward pass.

    For callers that decode themselves (a Ray Serve replica reading request bodies); `names` fill
    `Prediction.path` (default: the image's index).
    """
    _check_top_k(top_k)
    names = list(names) if names is not None else [str(index) for index in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    transform = eval_preprocessing(model.config)
    device = next(model.module.parameters()).device
    k = min(top_k, len(model.classes))
    predictions: list[Prediction] = []
    for batch_names, batch_images in zip(_batches(names, batch_size), _batches(images, batch_size), strict=True):
        batch = torch.stack([transform(image) for image in batch_images]).to(device)
        features, logits = model.net(batch)
        values, indices = logits.float().softmax(dim=1).cpu().topk(k, dim=1)
        verdicts = _verdicts(model, features.float().cpu(), len(batch_names))
        for name, vals, idxs, verdict in zip(batch_names, values.tolist(), indices.tolist(), verdicts, strict=True):
            top = [(model.classes[i], v) for i, v in zip(idxs, vals, strict=True)]
            predictions.append(Prediction(name, top, **verdict))
    return predictions


def predict_files(
    model: LoadedModel, paths: Sequence[str], top_k: int = 5, batch_size: int = 32
) -> tuple[list[Prediction], list[PredictionFailure]]:
    """Top-k (class, probability) per readable image; unreadable files are reported, not raised."""
    _check_top_k(top_k)
    predictions: list[Prediction] = []
    failures: list[PredictionFailure] = []
    for chunk in _batches(paths, batch_size):  # decode one batch at a time: full-size photos are large
        names: list[str] = []
        images: list[Tensor] = []
        for path in chunk:
            try:
                images.append(read_image(path))
                names.append(path)
            except UserInputError as err:
                failures.append(PredictionFailure(path, str(err)))
        if images:
            predictions += predict_tensors(model, images, names, top_k, batch_size)
    return predictions, failures

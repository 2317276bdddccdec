"""Batched inference: decoded images in, top-k classes and the open-set verdict out.

`predict_tensors` serves callers that decode themselves (a Ray Serve replica reading request
bodies); `predict_files` reads and decodes files first (`ray_jobs.data.decode`) and reports
unreadable ones instead of raising. The forward runs in the model's precision (fp32 or bf16
autocast, `LoadedModel.precision`). The open-set verdict comes from the model's calibration, with
the detector the caller names (None: the calibration's default); without a calibration,
predictions carry no score and nothing is flagged unknown.
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
from ray_jobs.inference.precision import autocast
from ray_jobs.model.inputs import eval_preprocessing


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first, and the open-set verdict.

    `detector`, `score` and `threshold` are None when the model has no calibration; `unknown` is
    then always False.
    """

    path: str
    top: list[tuple[str, float]]
    unknown: bool = False  # the detector's score is below its threshold
    detector: str | None = None  # the open-set detector that judged it
    score: float | None = None  # its score: higher = more like a known dish
    threshold: float | None = None  # the score below which a photo is unknown


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


def check_detector(model: LoadedModel, detector: str | None) -> None:
    """`UserInputError` (one line) when `detector` is named but the model's calibration lacks it."""
    if detector is None:
        return
    if model.calibration is None:
        raise UserInputError(f"--detector {detector}: model {model.source} has no open-set calibration")
    try:
        model.calibration.detector_name(detector)
    except ValueError as err:
        raise UserInputError(f"--detector {detector}: model {model.source} {err}") from None


def _verdicts(model: LoadedModel, features: Tensor, logits: Tensor, detector: str | None) -> list[dict[str, Any]]:
    """Prediction's open-set fields per image (none without a calibration)."""
    if model.calibration is None:
        return [{}] * len(features)
    verdicts = model.calibration.judge(features, logits, detector)
    return [{"unknown": unknown, "detector": verdicts.detector, "score": score, "threshold": threshold}
            for score, threshold, unknown in zip(verdicts.score.tolist(), verdicts.threshold.tolist(),
                                                 verdicts.unknown.tolist(), strict=True)]


@torch.no_grad()
def predict_tensors(
    model: LoadedModel, images: Sequence[Tensor], names: Sequence[str] | None = None, top_k: int = 5,
    batch_size: int = 32, detector: str | None = None,
) -> list[Prediction]:
    """Predictions for already-decoded images (uint8 RGB CHW, any size, as `read_image` returns them),
    `batch_size` images per forward pass.

    For callers that decode themselves (a Ray Serve replica reading request bodies); `names` fill
    `Prediction.path` (default: the image's index).
    """
    _check_top_k(top_k)
    check_detector(model, detector)
    names = list(names) if names is not None else [str(index) for index in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    transform = eval_preprocessing(model.config)
    device = next(model.module.parameters()).device
    k = min(top_k, len(model.classes))
    predictions: list[Prediction] = []
    for batch_names, batch_images in zip(_batches(names, batch_size), _batches(images, batch_size), strict=True):
        batch = torch.stack([transform(image) for image in batch_images]).to(device)
        with autocast(model.precision, device):  # the precision its calibration was made in
            features, logits = model.net(batch)
        values, indices = logits.float().softmax(dim=1).cpu().topk(k, dim=1)
        verdicts = _verdicts(model, features.float().cpu(), logits.float().cpu(), detector)
        for name, vals, idxs, verdict in zip(batch_names, values.tolist(), indices.tolist(), verdicts, strict=True):
            top = [(model.classes[i], v) for i, v in zip(idxs, vals, strict=True)]
            predictions.append(Prediction(name, top, **verdict))
    return predictions


def predict_files(
    model: LoadedModel, paths: Sequence[str], top_k: int = 5, batch_size: int = 32, detector: str | None = None,
) -> tuple[list[Prediction], list[PredictionFailure]]:
    """Top-k (class, probability) per readable image; unreadable files are reported, not raised."""
    _check_top_k(top_k)
    check_detector(model, detector)
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
            predictions += predict_tensors(model, images, names, top_k, batch_size, detector)
    return predictions, failures

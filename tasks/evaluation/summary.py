"""What a split's predictions add up to: scalar metrics, the per-class table, the confusion matrix, a 2-D PCA.

Pure functions of tensors; the top-1/top-5, loss and compactness figures are the same ones the
training loop reports for val (`ray_jobs.metrics.classification_metrics`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ray_jobs.metrics import classification_metrics
from tasks.evaluation.report import ClassMetrics


def summarize(
    features: Tensor, logits: Tensor, labels: Tensor, classes: list[str], prefix: str = "test"
) -> tuple[dict[str, float], list[ClassMetrics], np.ndarray]:
    """Scalar metrics, the per-class table and the confusion matrix (rows true, columns predicted)."""
    c = len(classes)
    predicted = logits.topk(1, dim=1).indices.squeeze(1)  # same tie-breaking as topk_correct's top-1
    matrix = torch.bincount(labels * c + predicted, minlength=c * c).view(c, c).numpy()
    hits = np.diag(matrix).astype(np.float64)
    support, predicted_count = matrix.sum(axis=1), matrix.sum(axis=0)
    precision = np.divide(hits, predicted_count, out=np.zeros(c), where=predicted_count > 0)
    recall = np.divide(hits, support, out=np.zeros(c), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=(precision + recall) > 0)
    per_class = [
        ClassMetrics(name=name, precision=float(p), recall=float(r), f1=float(f), support=int(s))
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    ]
    metrics = classification_metrics(features, logits, labels, c, prefix)
    metrics |= {
        f"{prefix}_macro_precision": float(precision.mean()),
        f"{prefix}_macro_recall": float(recall.mean()),
        f"{prefix}_macro_f1": float(f1.mean()),
    }
    return metrics, per_class, matrix


def pca_2d(features: Tensor) -> tuple[np.ndarray, list[float]]:
    """Exact PCA to 2-D by SVD (deterministic signs: largest loading positive) and explained variance."""
    x = features.to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * torch.where(signs == 0, 1.0, signs)
    variance = singular.pow(2)
    ratio = (variance[:2] / variance.sum().clamp(min=1e-12)).tolist()
    points = (x @ components.T).numpy()
    if points.shape[1] < 2:  # a single sample: pad the missing axis
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    return points, ratio

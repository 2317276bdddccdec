"""Evaluation metrics: top-k hits and feature compactness (the quantity center loss is meant to lower)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, per k.

    k is clipped to the number of classes, so `val_acc5` exists (and is 1.0) with fewer than 5 classes.
    Counts, not rates, so the engine can sum them over batches and ranks before dividing.
    """
    num_classes = logits.shape[1]
    maxk = min(max(ks), num_classes)
    top = logits.topk(maxk, dim=1).indices  # B x maxk
    hit = top.eq(labels.view(-1, 1))
    return {k: int(hit[:, : min(k, num_classes)].any(dim=1).sum().item()) for k in ks}


def compactness(features: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Intra-class spread relative to inter-class distance, from the empirical class means.

    - `intra`: mean over samples of ||x_i - m_{y_i}||, m_j the mean of class j's features here.
    - `inter`: mean over pairs of classes present here of ||m_a - m_b||.
    - `ratio`: intra / inter (NaN with fewer than two classes present).

    Empirical means rather than the learned centers so softmax, center-loss and L-GM runs are measured
    the same way. Not decomposable over batches or ranks: pass all of a split's features at once.
    """
    x = features.detach().to(torch.float64)
    y = labels.detach().long()
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
    present = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(1)
    intra = (x - means[y]).norm(dim=1).mean().item() if len(y) else float("nan")
    m = means[present]
    if len(m) >= 2:
        i, j = torch.triu_indices(len(m), len(m), offset=1, device=m.device)
        inter = (m[i] - m[j]).norm(dim=1).mean().item()
    else:
        inter = float("nan")
    ratio = intra / inter if inter > 0 else float("nan")  # NaN > 0 is False
    return {"intra": intra, "inter": inter, "ratio": ratio}

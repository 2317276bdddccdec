"""The metrics, once: top-k accuracy, loss and feature compactness (what center loss is meant to lower), AUROC.

The training loop's val metrics and evaluation's test metrics are the same dictionary
(`classification_metrics`), so `val_acc1` and `test_acc1` mean the same thing; the open-set
benchmark and tests score detectors with `auroc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


def classification_metrics(features: Tensor, logits: Tensor, labels: Tensor, num_classes: int,
                           prefix: str) -> dict[str, float]:
    """`<prefix>_acc1`, `_acc5`, `_ce_loss`, `_intra`, `_inter` and `_compactness` over a whole split."""
    total = max(len(labels), 1)
    correct = topk_correct(logits, labels, ks=(1, 5))
    ce = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    spread = compactness(features, labels, num_classes)
    return {
        f"{prefix}_acc1": correct[1] / total,
        f"{prefix}_acc5": correct[5] / total,
        f"{prefix}_ce_loss": ce,
        f"{prefix}_intra": spread["intra"],
        f"{prefix}_inter": spread["inter"],
        f"{prefix}_compactness": spread["ratio"],
    }


def auroc(known_scores: Tensor, unknown_scores: Tensor) -> float:
    """Probability that a known image scores higher than an unknown one (ties count half).

    Scores must grow with "known": pass `-distance` for distances.
    """
    n_known, n_unknown = len(known_scores), len(unknown_scores)
    if n_known == 0 or n_unknown == 0:
        return math.nan
    scores = torch.cat([known_scores.double(), unknown_scores.double()])
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties share their mean rank
    wins = mean_rank[inverse][:n_known].sum() - n_known * (n_known + 1) / 2  # Mann-Whitney U
    return float(wins / (n_known * n_unknown))

"""top-k hits and compactness, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ray_jobs.metrics import compactness, topk_correct


def test_topk_correct_by_hand() -> None:
    """Rankings: row0 [2,1,0,...] label 2 (top1); row1 [0,3,1,..] label 1 (top3 only);
    row2 [5,4,3,2,1,0] label 0 (last: top6 only); row3 label 4 with 4 ranked 2nd (top2)."""
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.9, 0.0, 0.0, 0.0],
            [0.9, 0.5, 0.0, 0.7, 0.0, 0.0],
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            [0.0, 0.0, 0.0, 0.0, 0.5, 0.9],
        ]
    )
    labels = torch.tensor([2, 1, 0, 4])
    assert topk_correct(logits, labels, ks=(1, 2, 3, 5)) == {1: 1, 2: 2, 3: 3, 5: 3}


def test_topk_k_clipped_to_num_classes() -> None:
    logits = torch.tensor([[0.2, 0.8, 0.0], [0.9, 0.05, 0.05]])
    labels = torch.tensor([2, 0])
    assert topk_correct(logits, labels) == {1: 1, 5: 2}  # top5 of 3 classes = all of them


def test_compactness_by_hand() -> None:
    """class 0: (0,0), (4,0) -> mean (2,0), distances 2, 2.
    class 1: (10,1), (10,-1), (10,0) -> mean (10,0), distances 1, 1, 0.
    class 2: absent (ignored). intra = (2+2+1+1+0)/5 = 1.2 (L2, not squared: that would be 2.0);
    inter = |(2,0)-(10,0)| = 8; ratio = 1.2/8 = 0.15."""
    features = torch.tensor([[0.0, 0.0], [4.0, 0.0], [10.0, 1.0], [10.0, -1.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    out = compactness(features, labels, num_classes=3)
    assert out["intra"] == pytest.approx(1.2)
    assert out["inter"] == pytest.approx(8.0)
    assert out["ratio"] == pytest.approx(0.15)


def test_compactness_inter_averages_over_pairs() -> None:
    """Means (0,0), (3,0), (0,4): pair distances 3, 4, 5 -> inter 4; every point on its mean -> intra 0."""
    features = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    out = compactness(features, torch.tensor([0, 1, 2]), num_classes=3)
    assert out["inter"] == pytest.approx(4.0) and out["intra"] == 0.0 and out["ratio"] == 0.0


def test_compactness_single_class_ratio_is_nan() -> None:
    out = compactness(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([1, 1]), num_classes=2)
    assert out["intra"] == pytest.approx(1.0) and math.isnan(out["inter"]) and math.isnan(out["ratio"])

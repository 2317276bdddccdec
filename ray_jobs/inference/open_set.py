"""Open-set rejection: is a photo one of the trained dishes, or none of them?

A classifier's softmax always picks one of its classes, even for a dish it never saw. Center loss
keeps one center per class in feature space, so the distance from a photo's features to the
nearest center is a natural "none of them" signal: a photo farther from its nearest center than
that class's own validation photos usually are is flagged `unknown`.

Centers by loss: center loss uses its trained centers (the objective's state), L-GM its learned
means (the head's `means`), softmax the class means of the validation features (it keeps none).

Distance: "relative" by default, the squared distance to the center minus the squared distance
to the origin, `||x - c||^2 - ||x||^2` (negative: nearer the center than the origin). Why the
origin: measured on food101_mini10 (`bench/open_set.py`, center loss), an unknown dish's features
are mostly *shorter* than a known one's (mean length 2.2 vs 3.2), so they lie towards the origin,
the point center loss starts every center from. Under center loss's own model (features of class
j spread as a Gaussian around c_j, the same spread for every class) with one more Gaussian at the
origin for "no dish", the relative distance is 2 sigma^2 times the log-likelihood ratio of "no
dish" against the nearest class. The nearest center is the Euclidean nearest one. AUROC over 3
splits: 0.77 relative, 0.74 cosine (1 - cos of the angle, which ignores length), 0.62 Euclidean
(which finds the short unknown features close to every center); max softmax probability 0.75
(3 fresh splits: 0.76 / 0.72 / 0.53 vs 0.74; docs/results.md).

Thresholds are calibrated on the validation split with the statistic the rule applies: each val
image's distance to its *nearest* center (labels are not used, so a mislabeled val photo does not
widen its labeled class's threshold). Per class, a typical distance: the median of those
distances over the val images nearest to it (for a class nearest to fewer than `min_class_images`,
the median of all of them; for the relative distance, measured from each center's own value
`-||c||^2`, which depends on the center's length). Then one global margin, the smallest that accepts at least
`accept_share` of all val images: an order statistic over every val image, so it is well defined
even with 15 val photos a class, where a per-class 95% order statistic is just the class's largest
distance. Cosine and Euclidean distances are positive and their spread grows with their size, so
the threshold is typical x factor; the relative one is signed, so it is typical + margin.

Pure torch and plain values (no data loading, no files): `ray_jobs.inference.calibrate` feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CenterKind = Literal["center_loss", "val_means", "lgm_means"]
CENTER_KINDS: tuple[str, ...] = ("center_loss", "val_means", "lgm_means")
Distance = Literal["relative", "cosine", "euclidean"]
DISTANCES: tuple[str, ...] = ("relative", "cosine", "euclidean")
DEFAULT_DISTANCE: Distance = "relative"
LEGACY_DISTANCE: Distance = "euclidean"  # what calibrations written before `distance` existed used
DEFAULT_ACCEPT_SHARE = 0.95
DEFAULT_MIN_CLASS_IMAGES = 10


@dataclass(frozen=True)
class Calibration:
    """Class centers and per-class distance thresholds, and how they were made."""

    centers: Tensor  # C x D, float32
    thresholds: Tensor  # C, float32: largest distance accepted as "known" for each class
    accept_share: float  # share of known val images the thresholds were set to accept
    center_kind: str  # one of CENTER_KINDS
    val_counts: list[int]  # val images nearest to each class, the ones its typical distance comes from
    fallback_classes: list[int]  # classes that got the global typical distance (too few val images nearest)
    distance: str = LEGACY_DISTANCE  # one of DISTANCES

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON-safe; float32 values survive the round trip exactly)."""
        return {
            "centers": self.centers.tolist(),
            "thresholds": self.thresholds.tolist(),
            "accept_share": self.accept_share,
            "center_kind": self.center_kind,
            "val_counts": list(self.val_counts),
            "fallback_classes": list(self.fallback_classes),
            "distance": self.distance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of `to_dict`; `ValueError` naming the problem for anything malformed."""
        try:
            centers = torch.tensor(data["centers"], dtype=torch.float32)
            thresholds = torch.tensor(data["thresholds"], dtype=torch.float32)
            calibration = cls(
                centers=centers,
                thresholds=thresholds,
                accept_share=float(data["accept_share"]),
                center_kind=str(data["center_kind"]),
                val_counts=[int(n) for n in data["val_counts"]],
                fallback_classes=[int(c) for c in data["fallback_classes"]],
                distance=str(data.get("distance", LEGACY_DISTANCE)),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"malformed open-set calibration ({type(err).__name__}: {err})") from None
        calibration.check()
        return calibration

    def check(self, num_classes: int | None = None, feat_dim: int | None = None) -> None:
        """`ValueError` unless shapes agree with each other (and with the model, when given)."""
        c = len(self.thresholds)
        if self.centers.dim() != 2 or self.thresholds.dim() != 1 or self.centers.shape[0] != c:
            raise ValueError(f"calibration centers {tuple(self.centers.shape)} and thresholds "
                             f"{tuple(self.thresholds.shape)} do not describe the same classes")
        if num_classes is not None and c != num_classes:
            raise ValueError(f"calibration has {c} classes, the model {num_classes}")
        if feat_dim is not None and self.centers.shape[1] != feat_dim:
            raise ValueError(f"calibration centers are {self.centers.shape[1]}-d, the model's features {feat_dim}-d")
        if self.center_kind not in CENTER_KINDS or self.distance not in DISTANCES or not 0.0 < self.accept_share <= 1.0:
            raise ValueError(f"calibration center_kind {self.center_kind!r} / distance {self.distance!r} / "
                             f"accept_share {self.accept_share}")


@dataclass(frozen=True)
class OpenSetResult:
    """Per image: nearest class, distance to its center, that class's threshold, and the verdict."""

    nearest: Tensor  # N, long
    distance: Tensor  # N, float32
    threshold: Tensor  # N, float32
    unknown: Tensor  # N, bool: distance > threshold


def center_distances(features: Tensor, centers: Tensor, distance: str = DEFAULT_DISTANCE) -> Tensor:
    """N x C distances (`distance`: one of `DISTANCES`, see the module docstring); a class whose
    center is NaN (no val images to average) is at +inf."""
    x, c = features.double(), torch.nan_to_num(centers.double(), nan=0.0)
    if distance == "relative":
        d = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist").pow(2) - x.pow(2).sum(dim=1, keepdim=True)
    elif distance == "cosine":
        d = 1.0 - F.normalize(x, dim=1) @ F.normalize(c, dim=1).T
    elif distance == "euclidean":
        d = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist")
    else:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    d[:, torch.isnan(centers).any(dim=1)] = math.inf
    return d.float()


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """C x D mean feature per class (the softmax model's centers); NaN rows for classes with no images."""
    x = features.double()
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels.long(), x)
    counts = torch.bincount(labels.long(), minlength=num_classes).double().unsqueeze(1)
    return (sums / counts).float()  # 0/0 = NaN for an absent class


def accept_threshold(distances: Tensor, accept_share: float) -> float:
    """The smallest value accepting at least `accept_share` of `distances` (`<=` accepts)."""
    if len(distances) == 0:
        raise ValueError("no distances to calibrate a threshold on")
    k = min(max(math.ceil(accept_share * len(distances) - 1e-9), 1), len(distances))
    return float(distances.double().sort().values[k - 1])


def calibrate(
    features: Tensor,
    centers: Tensor,
    center_kind: str,
    accept_share: float = DEFAULT_ACCEPT_SHARE,
    distance: str = DEFAULT_DISTANCE,
    min_class_images: int = DEFAULT_MIN_CLASS_IMAGES,
) -> Calibration:
    """Per-class thresholds from known (validation) features; see the module docstring for the rule."""
    if not 0.0 < accept_share <= 1.0:
        raise ValueError(f"accept_share must be in (0, 1], got {accept_share}")
    num_classes = centers.shape[0]
    nearest_distance, nearest = center_distances(features, centers, distance).double().min(dim=1)
    finite = torch.isfinite(nearest_distance)
    if not finite.any():
        raise ValueError("no val image has a finite distance to any center")
    nearest_distance, nearest = nearest_distance[finite], nearest[finite]
    counts = torch.bincount(nearest, minlength=num_classes).tolist()
    fallback = [cls for cls, count in enumerate(counts) if count < max(min_class_images, 1)]
    if distance == "relative":  # signed: a shift per class, measured from the center's own value
        at_center = -torch.nan_to_num(centers.double(), nan=0.0).pow(2).sum(dim=1)  # ||c - c||^2 - ||c||^2
        typical = at_center + _median_per_class(nearest_distance - at_center[nearest], nearest, fallback, num_classes)
        thresholds = typical + accept_threshold(nearest_distance - typical[nearest], accept_share)
    else:  # positive: a scale per class (1 where the median is 0: the factor then carries the threshold alone)
        typical = _median_per_class(nearest_distance, nearest, fallback, num_classes)
        scale = torch.where(typical > 0, typical, torch.ones_like(typical))
        thresholds = scale * accept_threshold(nearest_distance / scale[nearest], accept_share)
    calibration = Calibration(
        centers=centers.detach().float().cpu().clone(),
        thresholds=_round_up_to_float32(thresholds),
        accept_share=float(accept_share),
        center_kind=center_kind,
        val_counts=counts,
        fallback_classes=fallback,
        distance=distance,
    )
    calibration.check()
    return calibration


def _median_per_class(values: Tensor, nearest: Tensor, fallback: list[int], num_classes: int) -> Tensor:
    """Per class, the median of `values` over the images nearest to it; the overall median for `fallback`."""
    overall = values.median()
    return torch.stack([overall if cls in fallback else values[nearest == cls].median() for cls in range(num_classes)])


def _round_up_to_float32(values: Tensor) -> Tensor:
    """float32 thresholds never below the float64 ones, so a val image accepted in float64 stays accepted."""
    rounded = values.float()
    below = rounded.double() < values
    return torch.where(below, torch.nextafter(rounded, torch.tensor(math.inf)), rounded)


def open_set_scores(features: Tensor, calibration: Calibration) -> OpenSetResult:
    """Nearest class, its distance and threshold, and `unknown` = distance > threshold, per image."""
    distance, nearest = center_distances(features, calibration.centers, calibration.distance).min(dim=1)
    threshold = calibration.thresholds[nearest]
    return OpenSetResult(nearest=nearest, distance=distance, threshold=threshold, unknown=distance > threshold)


def max_softmax_probability(logits: Tensor) -> Tensor:
    """Baseline "known" score (Hendrycks & Gimpel 2017): higher = more likely a trained class."""
    return logits.float().softmax(dim=1).max(dim=1).values


def max_logit(logits: Tensor) -> Tensor:
    """Baseline "known" score (Hendrycks et al. 2022): the largest raw logit."""
    return logits.float().max(dim=1).values

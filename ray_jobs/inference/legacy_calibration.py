"""Open-set calibrations written before the detectors existed (`train-food-open-set/1`): read and applied, never made.

Such a file holds class centers and one distance threshold per class: a photo is unknown when
its distance to the nearest center exceeds that class's threshold. The distance is the one the
file names: "relative" (`||x - c||^2 - ||x||^2`), "cosine", or "euclidean" (files older than the
`distance` field). A model registered with one still loads and serves as it did, and says that
it uses this older rule (`describe`); evaluating its checkpoint again fits the current detectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_jobs.inference.verdicts import Verdicts

LEGACY_DETECTOR = "center_distance_per_class"
CENTER_KINDS: tuple[str, ...] = ("center_loss", "val_means", "lgm_means")
DISTANCES: tuple[str, ...] = ("relative", "cosine", "euclidean")
OLDEST_DISTANCE = "euclidean"  # what files written before `distance` existed used


@dataclass(frozen=True)
class LegacyCalibration:
    """Class centers and per-class distance thresholds, as an older train-food stored them."""

    centers: Tensor  # C x D, float32
    thresholds: Tensor  # C, float32: largest distance accepted as "known" for each class
    accept_share: float
    center_kind: str  # one of CENTER_KINDS
    distance: str = OLDEST_DISTANCE  # one of DISTANCES

    default: str = LEGACY_DETECTOR
    older: ClassVar[bool] = True  # say so wherever the model is loaded

    @property
    def detector_names(self) -> tuple[str, ...]:
        return (LEGACY_DETECTOR,)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LegacyCalibration:
        """From the file's `calibration` object; `ValueError` naming the problem for anything malformed."""
        try:
            calibration = cls(
                centers=torch.tensor(data["centers"], dtype=torch.float32),
                thresholds=torch.tensor(data["thresholds"], dtype=torch.float32),
                accept_share=float(data["accept_share"]),
                center_kind=str(data["center_kind"]),
                distance=str(data.get("distance", OLDEST_DISTANCE)),
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

    def detector_name(self, requested: str | None) -> str:
        """The only rule such a file holds; `ValueError` for any other name."""
        if requested not in (None, LEGACY_DETECTOR):
            raise ValueError(f"has an {self.describe()}, not detector {requested!r}: "
                             "evaluate the checkpoint again to fit the current detectors")
        return LEGACY_DETECTOR

    def describe(self, detector: str | None = None) -> str:
        return (f"older calibration: {self.distance} distance to the nearest {self.center_kind} center, "
                f"per-class thresholds accepting {self.accept_share:.0%} of val photos")

    def judge(self, features: Tensor, logits: Tensor, detector: str | None = None) -> Verdicts:
        """Score = minus the distance to the nearest center; unknown beyond that class's threshold."""
        self.detector_name(detector)
        distance, nearest = center_distances(features, self.centers, self.distance).min(dim=1)
        threshold = self.thresholds[nearest]
        return Verdicts(LEGACY_DETECTOR, score=-distance.double(), threshold=-threshold.double(),
                        unknown=distance > threshold)


def center_distances(features: Tensor, centers: Tensor, distance: str) -> Tensor:
    """N x C distances; a class whose center is NaN (no val images to average) is at +inf."""
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

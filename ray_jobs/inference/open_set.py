"""Open-set rejection: is a photo one of the trained dishes, or none of them?

A classifier's softmax always picks one of its classes, even for a dish it never saw. After
training, every detector of `ray_jobs.inference.detectors` is fit once on the eval-mode
(unaugmented) features and logits of the kept model's train photos, and each gets one threshold
from the val photos, which the fit did not see: the largest that accepts `accept_share` of them
(`detectors.accept_threshold`). A photo is unknown when its score is below the threshold of the
detector in use: `default`, the first of `DETECTOR_RANKING` (`bench/open_set.py`'s order by
paired mean AUROC) that the model has, unless the user names another. KNN's k is chosen on val too, by leaving one class out.

Features for the fit and the thresholds come from the forward in the precision the calibration
is for (`precision`; `ray_jobs.inference.calibrate` makes one per precision a model may be served
in); a detector's tensors are rounded to float32, as stored, before its threshold is set, so the
stored threshold is exactly the one the stored detector earns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ray_jobs.inference.detector_names import DETECTORS
from ray_jobs.inference.detectors import (
    Detector,
    FitData,
    accept_threshold,
    choose_knn_k,
    detector_from_state,
    make_detector,
)
from ray_jobs.inference.verdicts import Verdicts

# bench/open_set.py's order by paired mean AUROC over its 10 models (softmax, the shipped budget: Lite2 at 260 px,
# 10 epochs, last epoch; 5 splits holding 2 of 10 dishes out, x 2 seeds): mahalanobis_normalised 0.850, rmd 0.824,
# vim 0.818, knn 0.814, MSP 0.810 (docs/results.md). Only the first is used unless a calibration lacks it.
DETECTOR_RANKING = ("mahalanobis_normalised", "rmd", "vim", "knn", "msp", "center_distance", "max_logit", "energy",
                    "mahalanobis")
DEFAULT_ACCEPT_SHARE = 0.95


@dataclass(frozen=True)
class OpenSetCalibration:
    """Every detector fit on one model, each with its threshold, and the one used unless another is named."""

    detectors: dict[str, Detector]
    thresholds: dict[str, float]  # known when score >= threshold
    default: str
    accept_share: float
    fit_photos: int  # train photos the detectors were fit on
    val_photos: int  # val photos the thresholds come from
    precision: str = "fp32"  # of the forward its features came from
    older: ClassVar[bool] = False

    @property
    def detector_names(self) -> tuple[str, ...]:
        return tuple(self.detectors)

    def detector_name(self, requested: str | None) -> str:
        """`requested`, or the default when None; `ValueError` for a name this calibration lacks."""
        name = requested or self.default
        if name not in self.detectors:
            raise ValueError(f"has no detector {name!r}; it has {', '.join(self.detectors)}")
        return name

    def describe(self, detector: str | None = None) -> str:
        name = self.detector_name(detector)
        return (f"detector {name}, threshold {self.thresholds[name]:.4g} accepting {self.accept_share:.0%} "
                f"of {self.val_photos} val photos (fit on {self.fit_photos} train photos)")

    def judge(self, features: Tensor, logits: Tensor, detector: str | None = None) -> Verdicts:
        """Scores and verdicts of `detector` (default: `self.default`) for a batch."""
        name = self.detector_name(detector)
        score = self.detectors[name].score(features, logits)
        threshold = torch.full_like(score, self.thresholds[name])
        return Verdicts(name, score=score, threshold=threshold, unknown=score < threshold)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-safe."""
        return {"default": self.default, "accept_share": self.accept_share, "fit_photos": self.fit_photos,
                "val_photos": self.val_photos, "precision": self.precision,
                "detectors": {name: {"options": dict(detector.options), "threshold": self.thresholds[name]}
                              for name, detector in self.detectors.items()}}

    def tensors(self) -> dict[str, Tensor]:
        """The detectors' tensors as float32, keyed `detector/tensor`."""
        return {f"{name}/{key}": value.float().contiguous()
                for name, detector in self.detectors.items() for key, value in detector.tensors.items()}

    @classmethod
    def from_parts(cls, metadata: dict[str, Any], tensors: dict[str, Tensor]) -> OpenSetCalibration:
        """Inverse of `metadata` and `tensors`; `ValueError` (or `KeyError`/`TypeError`) for anything malformed."""
        detectors, thresholds = {}, {}
        for name, entry in metadata["detectors"].items():
            prefix = f"{name}/"
            state = {"name": name, "options": entry["options"],
                     "tensors": {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}}
            detectors[name] = detector_from_state(state)
            thresholds[name] = float(entry["threshold"])
        calibration = cls(detectors=detectors, thresholds=thresholds, default=str(metadata["default"]),
                          accept_share=float(metadata["accept_share"]), fit_photos=int(metadata["fit_photos"]),
                          val_photos=int(metadata["val_photos"]), precision=str(metadata["precision"]))
        calibration.detector_name(None)
        return calibration

    def check(self, num_classes: int, feat_dim: int) -> None:
        """`ValueError` unless every detector scores a photo of this model's shape."""
        for name in self.detectors:
            try:
                self.judge(torch.zeros(1, feat_dim), torch.zeros(1, num_classes), name)
            except (RuntimeError, IndexError, KeyError) as err:
                raise ValueError(f"detector {name} does not fit a model with {num_classes} classes and "
                                 f"{feat_dim}-d features ({type(err).__name__})") from None


def fit_open_set(train: FitData, val_features: Tensor, val_logits: Tensor, val_labels: Tensor,
                 accept_share: float = DEFAULT_ACCEPT_SHARE, names: tuple[str, ...] = DETECTORS
                 ) -> OpenSetCalibration:
    """Fit `names` on `train`, then set each one's threshold on the val photos (see the module docstring)."""
    if len(val_features) == 0:
        raise ValueError("no val photos to set the open-set thresholds on")
    detectors: dict[str, Detector] = {}
    thresholds: dict[str, float] = {}
    for name in names:
        options = {"k": choose_knn_k(train, val_features, val_labels)} if name == "knn" else {}
        detector = make_detector(name, **options).fit(train)
        detector.tensors = {key: value.float().contiguous().double() for key, value in detector.tensors.items()}  # as stored
        detectors[name] = detector
        thresholds[name] = accept_threshold(detector.score(val_features, val_logits), accept_share)
    default = next(name for name in DETECTOR_RANKING if name in detectors)
    return OpenSetCalibration(detectors=detectors, thresholds=thresholds, default=default, accept_share=accept_share,
                              fit_photos=len(train.features), val_photos=len(val_features))

"""Post-hoc open-set detectors behind one interface: fit once on known photos, score any photo.

Each detector is fit on the *eval-mode* (unaugmented) train features and logits of the kept model
and scores a photo so that **higher means more like a known dish**; a threshold on that score (set
on photos the fit did not see) turns it into "unknown dish". The state of a fitted detector is
plain tensors and numbers (`state()` / `from_state`), stored beside the model as its calibration.

- `msp`, `max_logit`, `energy`: from the logits alone (Hendrycks & Gimpel 2017; Hendrycks et al.
  2022; Liu et al. 2020: energy = logsumexp of the logits).
- `center_distance`: minus the relative squared distance `||x - c||^2 - ||x||^2` to the nearest
  class mean of the train features (see `ray_jobs.inference.open_set` for why relative).
- `mahalanobis`: minus the smallest Mahalanobis distance to a class mean, one covariance shared by
  the classes (Lee et al. 2018), shrunk towards a scaled identity by Ledoit-Wolf: with D-dimensional
  features and not many more photos than D the plain inverse is ill-conditioned.
- `mahalanobis_normalised`: the same on features scaled to unit length first (Mahalanobis++,
  Mueller & Hein 2025): an unknown dish's features are shorter than a known one's, which puts them
  near the shared covariance's centre, where plain Mahalanobis calls them known.
- `rmd`: Relative Mahalanobis (Ren et al. 2021): the class distance minus the distance under one
  Gaussian fit to all train features, which removes what every class shares.
- `knn`: minus the cosine distance to the k-th nearest train feature (Sun et al. 2022).
- `vim`: ViM (Wang et al. 2022): energy minus a virtual logit, the norm of the feature's part
  outside the train features' principal subspace, scaled to match the logits.

Thresholds: `accept_threshold`, the rule every detector's threshold is set by (in serving and in
the bench alike). Pure torch, fp64 arithmetic whatever the model ran in; `tests/test_detectors.py` checks
each against pytorch-ood's implementation on fixed tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_jobs.inference.detector_names import DETECTORS
from ray_jobs.metrics import auroc

KNN_K_CHOICES = (1, 5, 10, 20, 50)


@dataclass
class FitData:
    """What a detector may fit on: eval-mode train features, logits and labels, and the linear head."""

    features: Tensor  # N x D
    logits: Tensor  # N x C
    labels: Tensor  # N
    head_weight: Tensor | None = None  # C x D (ViM needs the head that makes the logits)
    head_bias: Tensor | None = None  # C

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]


@dataclass
class Detector:
    """A fitted detector's name, options and state; `score` is higher for more known-looking photos."""

    name: ClassVar[str] = ""
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def fit(self, data: FitData) -> Detector:
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON-safe)."""
        return {"name": self.name, "options": dict(self.options),
                "tensors": {key: value.tolist() for key, value in self.tensors.items()}}


class MaxSoftmax(Detector):
    name = "msp"

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return logits.double().softmax(dim=1).max(dim=1).values


class MaxLogit(Detector):
    name = "max_logit"

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return logits.double().max(dim=1).values


class Energy(Detector):
    name = "energy"

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return torch.logsumexp(logits.double(), dim=1)


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """C x D means of each class's features (every class must occur)."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no photos to fit on")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features.double())
    return sums / counts.unsqueeze(1)


class CenterDistance(Detector):
    name = "center_distance"

    def fit(self, data: FitData) -> Detector:
        self.tensors = {"centers": class_means(data.features, data.labels, data.num_classes)}
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        x = features.double()
        relative = torch.cdist(x, self.tensors["centers"]).pow(2) - x.pow(2).sum(dim=1, keepdim=True)
        return -relative.min(dim=1).values


def ledoit_wolf_precision(centered: Tensor, shrinkage: float | None = None) -> tuple[Tensor, float]:
    """Inverse of the shrunk covariance of `centered` (N x D, already mean-free) and the shrinkage (the
    weight of the scaled identity): Ledoit-Wolf's, as scikit-learn's `ledoit_wolf` computes it, unless given."""
    x = centered.double()
    n, d = x.shape
    sample = x.T @ x / n
    mu = sample.diagonal().mean()
    if shrinkage is None:
        delta = (sample - mu * torch.eye(d, dtype=x.dtype)).pow(2).sum() / d
        x2 = x.pow(2)
        beta = ((x2.T @ x2) / n - sample.pow(2)).sum() / (d * n)
        shrinkage = float(torch.clamp(beta / delta, max=1.0)) if delta > 0 else 1.0
    shrunk = (1 - shrinkage) * sample + shrinkage * mu * torch.eye(d, dtype=x.dtype)
    return torch.linalg.inv(shrunk), shrinkage


def _squared_mahalanobis(x: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """N x C squared Mahalanobis distances of each row of `x` to each mean."""
    centered = x.unsqueeze(1) - means.unsqueeze(0)  # N x C x D
    return torch.einsum("ncd,de,nce->nc", centered, precision, centered)


class Mahalanobis(Detector):
    name = "mahalanobis"

    def fit(self, data: FitData) -> Detector:
        means = class_means(data.features, data.labels, data.num_classes)
        fixed = self.options.get("shrinkage")
        precision, shrinkage = ledoit_wolf_precision(data.features.double() - means[data.labels], fixed)
        self.tensors = {"means": means, "precision": precision}
        self.options = {"shrinkage": shrinkage}
        return self

    def class_distances(self, features: Tensor) -> Tensor:
        return _squared_mahalanobis(features.double(), self.tensors["means"], self.tensors["precision"])

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return -self.class_distances(features).min(dim=1).values


class NormalisedMahalanobis(Mahalanobis):
    name = "mahalanobis_normalised"

    def fit(self, data: FitData) -> Detector:
        return super().fit(replace(data, features=F.normalize(data.features.double(), dim=1)))

    def class_distances(self, features: Tensor) -> Tensor:
        return super().class_distances(F.normalize(features.double(), dim=1))


class RelativeMahalanobis(Mahalanobis):
    name = "rmd"

    def fit(self, data: FitData) -> Detector:
        fixed = self.options.get("shrinkage")
        super().fit(data)
        background = data.features.double().mean(dim=0)
        precision, shrinkage = ledoit_wolf_precision(data.features.double() - background, fixed)
        self.tensors |= {"background_mean": background.unsqueeze(0), "background_precision": precision}
        self.options["background_shrinkage"] = shrinkage
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        x = features.double()
        background = _squared_mahalanobis(x, self.tensors["background_mean"], self.tensors["background_precision"])
        return -(self.class_distances(features) - background).min(dim=1).values


class KNN(Detector):
    name = "knn"

    def fit(self, data: FitData) -> Detector:
        self.options.setdefault("k", 10)
        if not 1 <= int(self.options["k"]) <= len(data.features):
            raise ValueError(f"knn: k={self.options['k']} must be between 1 and the {len(data.features)} train photos")
        self.tensors = {"bank": F.normalize(data.features.double(), dim=1)}
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        query = F.normalize(features.double(), dim=1)
        distances = torch.cdist(query, self.tensors["bank"])  # Euclidean between unit vectors ~ cosine
        return -distances.kthvalue(int(self.options["k"]), dim=1).values


class ViM(Detector):
    name = "vim"

    def fit(self, data: FitData) -> Detector:
        if data.head_weight is None or data.head_bias is None:
            raise ValueError("vim needs the linear head (weight and bias) that makes the logits")
        w, b = data.head_weight.double(), data.head_bias.double()
        dim = w.shape[1]
        principal = int(self.options.get("principal_dim") or max(1, min(dim // 2, dim - 1)))
        origin = -(torch.linalg.pinv(w) @ b)
        x = data.features.double() - origin
        _, vectors = torch.linalg.eigh(x.T @ x / len(x))  # ascending eigenvalues
        residual = vectors[:, : dim - principal].contiguous()  # the complement of the principal subspace
        virtual = (x @ residual).norm(dim=1)
        logits = data.features.double() @ w.T + b
        alpha = logits.max(dim=1).values.mean() / virtual.mean()
        self.options = {"principal_dim": principal, "alpha": float(alpha)}
        self.tensors = {"origin": origin, "residual": residual, "weight": w, "bias": b}
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        x = features.double()
        t = self.tensors
        virtual = ((x - t["origin"]) @ t["residual"]).norm(dim=1) * self.options["alpha"]
        return torch.logsumexp(x @ t["weight"].T + t["bias"], dim=1) - virtual


_CLASSES: dict[str, type[Detector]] = {cls.name: cls for cls in (
    MaxSoftmax, MaxLogit, Energy, CenterDistance, Mahalanobis, NormalisedMahalanobis, RelativeMahalanobis, KNN, ViM)}


def make_detector(name: str, **options: Any) -> Detector:
    """An unfitted detector by name (see `DETECTORS`)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
    return _CLASSES[name](options=dict(options))


def detector_from_state(state: dict[str, Any]) -> Detector:
    """A fitted detector back from `Detector.state()`."""
    detector = make_detector(state["name"], **state.get("options", {}))
    detector.tensors = {key: torch.as_tensor(value, dtype=torch.float64) for key, value in state["tensors"].items()}
    return detector


def accept_threshold(scores: Tensor, accept_share: float) -> float:
    """The largest threshold accepting at least `accept_share` of `scores` (a photo is known when
    `score >= threshold`): an order statistic, so it is defined for any number of photos."""
    if len(scores) == 0:
        raise ValueError("no scores to set a threshold on")
    if not 0.0 < accept_share <= 1.0:
        raise ValueError(f"accept_share must be in (0, 1], got {accept_share}")
    k = min(max(math.ceil(accept_share * len(scores) - 1e-9), 1), len(scores))
    return float(scores.double().sort(descending=True).values[k - 1])


def choose_knn_k(data: FitData, val_features: Tensor, val_labels: Tensor,
                 choices: Sequence[int] = KNN_K_CHOICES) -> int:
    """KNN's k chosen on val photos alone, with no unknown dish to tune on: leave one class out.

    For each class c, the train bank without c scores val photos: those of c stand in for an
    unknown dish, the others for known ones. The k with the best mean AUROC over classes wins (the
    smallest on a tie); with fewer than two classes in val, the smallest choice of at least 10.
    """
    bank = F.normalize(data.features.double(), dim=1)
    distances = torch.cdist(F.normalize(val_features.double(), dim=1), bank)
    classes = sorted(set(val_labels.tolist()))
    smallest_bank = min(int((data.labels != c).sum()) for c in classes) if classes else len(bank)
    usable = [k for k in choices if k <= smallest_bank] or [1]
    if len(classes) < 2:
        return min([k for k in usable if k >= 10] or [max(usable)])

    def mean_auroc(k: int) -> float:
        per_class = []
        for c in classes:
            score = -distances[:, data.labels != c].kthvalue(k, dim=1).values
            per_class.append(auroc(score[val_labels != c], score[val_labels == c]))
        return sum(per_class) / len(per_class)

    return max(usable, key=lambda k: (mean_auroc(k), -k))

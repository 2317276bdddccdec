"""The open-set answer for a batch of photos, whichever rule gave it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Verdicts:
    """Per photo: the detector's score (higher = more like a known dish), the threshold it was held
    to, and `unknown` = score below it."""

    detector: str
    score: Tensor  # N, float64
    threshold: Tensor  # N, float64
    unknown: Tensor  # N, bool

"""The open-set detectors' names, importable without torch (the CLI's flags and configs list them)."""

from __future__ import annotations

from typing import Literal, get_args

DetectorName = Literal["msp", "max_logit", "energy", "center_distance", "mahalanobis", "mahalanobis_normalised", "rmd",
                       "knn", "vim"]
DETECTORS: tuple[str, ...] = get_args(DetectorName)

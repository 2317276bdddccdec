"""Whether a new version may take the champion alias: compare only like with like, then the metric.

A new version is compared with the champion only when both were scored on the whole test split
of the same dataset build (fingerprint) with the same class list, and the new one on the dataset
it was trained on. A `--limit` or cross-dataset evaluation is registered but never promoted. An
incomparable version is registered, the alias stays, and the reason is recorded (version tag
`registration`, `RegistrationResult.reason`). Each version carries the tags the comparison reads
(`comparability_tags`: `dataset_fingerprint`, `classes`, `evaluated_split`, `complete_split`, ...).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.evaluate import EvaluationReport

if TYPE_CHECKING:
    from tasks.register import RegisterConfig

__all__ = ["Champion", "comparability_tags", "current_champion", "decide"]

_CLASSES_TAG_MAX = 4000  # longer class lists are tagged by their hash (MLflow caps tag values)


@dataclass(frozen=True)
class Champion:
    """The alias holder as the decision sees it: its version, its score and how it was scored (tags)."""

    version: str
    value: float  # NaN if it has no value of the metric
    tags: dict[str, str]


def current_champion(client: Any, name: str, alias: str, metric: str) -> Champion | None:
    """The current alias holder with its metric and version tags; None if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    tags = dict(holder.tags)
    value = float(tags[metric]) if metric in tags else None
    if value is None and holder.run_id:
        value = client.get_run(holder.run_id).data.metrics.get(metric)
    return Champion(str(holder.version), float("nan") if value is None else float(value), tags)


def _classes_tag(classes: list[str]) -> str:
    """The class list as one tag value; hashed when too long for MLflow, so equal lists still match."""
    text = json.dumps(classes)
    return text if len(text) <= _CLASSES_TAG_MAX else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def comparability_tags(report: EvaluationReport) -> dict[str, str]:
    """What a later registration reads from this version to know whether the two scores compare."""
    return {
        "dataset_fingerprint": report.dataset_fingerprint,
        "train_dataset_fingerprint": report.train_dataset_fingerprint,
        "classes": _classes_tag(report.classes),
        "evaluated_split": report.split,
        "complete_split": str(report.complete).lower(),
        "evaluated_images": str(report.counts.get("images", 0)),
        "cross_dataset": str(report.cross_dataset).lower(),
    }


def _short(fingerprint: str) -> str:
    """A fingerprint short enough for a one-line reason."""
    return fingerprint[:12] or "(unrecorded)"


def _candidate_not_comparable(report: EvaluationReport) -> str | None:
    """Why this evaluation can never be promoted, or None."""
    if report.split != "test":
        return f"it was scored on the {report.split} split, not test"
    if not report.complete:
        limit = f" (--limit {report.limit})" if report.limit else ""
        return f"it was scored on {report.counts.get('images', 0)} of the {report.split_rows} test images{limit}"
    if report.cross_dataset or report.train_dataset_fingerprint != report.dataset_fingerprint:
        return (f"it was trained on dataset {_short(report.train_dataset_fingerprint)} "
                f"and scored on dataset {_short(report.dataset_fingerprint)}")
    return None


def _champion_not_comparable(champion: Champion, report: EvaluationReport, alias: str) -> str | None:
    """Why the champion's score says nothing about this one, or None."""
    tags, who = champion.tags, f"{alias} version {champion.version}"
    if "classes" not in tags or "complete_split" not in tags:
        return f"{who} has no record of how it was scored (registered by an older train-food)"
    if tags.get("dataset_fingerprint") != report.dataset_fingerprint:
        return (f"{who} was scored on dataset {_short(tags.get('dataset_fingerprint', ''))}, "
                f"this on {_short(report.dataset_fingerprint)}")
    if tags["classes"] != _classes_tag(report.classes):
        return f"{who} has a different class list"
    if tags.get("evaluated_split") != "test" or tags["complete_split"] != "true":
        return f"{who} was not scored on the whole test split"
    return None


def decide(
    new: float, version: str, report: EvaluationReport, current: Champion | None, cfg: RegisterConfig
) -> tuple[bool, str]:
    """(promote, one-line reason): the reason is recorded on the version, so a kept alias explains itself."""
    metric, alias = cfg.metric, cfg.alias
    unchanged = f"{alias} unchanged" if current else f"no {alias} set"
    if math.isnan(new):
        return False, f"version {version} has no finite {metric}; {unchanged}"
    why = _candidate_not_comparable(report)
    if why is not None:
        return False, f"not compared: version {version} is not promotable, {why}; {unchanged}"
    if current is None:
        return True, f"no {alias} yet: version {version} ({metric} {new:.4f}) becomes {alias}"
    why = _champion_not_comparable(current, report, alias)
    if why is not None:
        return False, f"not compared: {why}; {alias} unchanged"
    old_version, old = current.version, current.value
    if math.isnan(old):
        return True, (f"{alias} version {old_version} has no {metric}; "
                      f"version {version} ({metric} {new:.4f}) replaces it")
    better = new > old if cfg.greater_is_better else new < old
    if better:
        return True, f"version {version} ({metric} {new:.4f}) beats {alias} version {old_version} ({old:.4f})"
    return False, (f"version {version} ({metric} {new:.4f}) does not beat {alias} version {old_version} "
                   f"({old:.4f}); {alias} stays on version {old_version}")

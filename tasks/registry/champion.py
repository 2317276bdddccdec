"""Whether a new version may take the champion alias: compare only like with like, then the metric.

A new version is compared with the champion only when both were scored on the whole test split
of the same data with the same class list, and the new one on the dataset it was trained on. A
`--limit` or cross-dataset evaluation is registered but never promoted. An incomparable version
is registered, the alias stays, and the reason is recorded (version tag `registration`,
`RegistrationResult.reason`). Each version carries the tags the comparison reads
(`comparability_tags`: `test_split_digest`, `dataset_fingerprint`, `classes`, `evaluated_split`,
`complete_split`, ...).

"The same data" is the same test split: equal `test_split_digest`s (`ray_jobs.dataset_format.
rows_digest`, over the class list and every test row's stored image and label), so a re-ingest
of the same photos by edited ingest code (a new dataset fingerprint) still compares. A champion
registered before the digest was tagged gets it computed from its `dataset` tag when that dataset
still holds the build it was scored on; otherwise the dataset fingerprints must be equal, as
before. `RegisterConfig.compare_across_datasets` skips this check on request (the classes and the
whole test split still count) and the version is tagged `compared_across_datasets`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from ray_jobs.dataset_format import digest_of_test_split, read_manifest
from ray_jobs.errors import UserInputError
from tasks.evaluation.report import EvaluationReport
from tasks.registry.config import RegisterConfig

__all__ = ["Champion", "Decision", "comparability_tags", "current_champion", "decide"]

log = logging.getLogger(__name__)

_CLASSES_TAG_MAX = 4000  # longer class lists are tagged by their hash (MLflow caps tag values)
ACROSS_TAG = "compared_across_datasets"  # "true" on a version compared with a champion scored on other data


@dataclass(frozen=True)
class Champion:
    """The alias holder as the decision sees it: its version, its score and how it was scored (tags)."""

    version: str
    value: float  # NaN if it has no value of the metric
    tags: dict[str, str]


class Decision(NamedTuple):
    """Whether the new version takes the alias, the one-line reason, and whether its comparison crossed datasets."""

    promote: bool
    reason: str
    compared_across_datasets: bool = False  # compared with a champion scored on another test split, on request


def current_champion(client: Any, name: str, alias: str, metric: str) -> Champion | None:
    """The current alias holder with its metric and version tags; None if there is none.

    The score is the metric its registration logged in its run, never a version tag: tags can be set
    by anyone afterwards (`--tag test_acc1=0.99`, or a typo that is not a number)."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    value = client.get_run(holder.run_id).data.metrics.get(metric) if holder.run_id else None
    return Champion(str(holder.version), float("nan") if value is None else float(value), dict(holder.tags))


def _classes_tag(classes: list[str]) -> str:
    """The class list as one tag value; hashed when too long for MLflow, so equal lists still match."""
    text = json.dumps(classes)
    return text if len(text) <= _CLASSES_TAG_MAX else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def comparability_tags(report: EvaluationReport) -> dict[str, str]:
    """What a later registration reads from this version to know whether the two scores compare."""
    return {
        "dataset_fingerprint": report.dataset_fingerprint,
        "train_dataset_fingerprint": report.train_dataset_fingerprint,
        "test_split_digest": report.test_split_digest or "",  # "": a report made before digests
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


def _digest_of_recorded_dataset(tags: dict[str, str]) -> str | None:
    """The test-split digest of the dataset a version tags (`dataset`), for versions tagged before digests.

    None when it cannot be known: no dataset recorded, the dataset is gone or unreadable, or its
    folder now holds another build than the one the version was scored on (other fingerprint).
    """
    dataset, fingerprint = tags.get("dataset", ""), tags.get("dataset_fingerprint", "")
    if not dataset or not fingerprint:
        return None
    try:
        manifest = read_manifest(dataset)
        if manifest.get("fingerprint") != fingerprint:
            log.info("register: %s now holds dataset %s, not %s; no test-split digest for the champion",
                     dataset, _short(str(manifest.get("fingerprint", ""))), _short(fingerprint))
            return None
        return digest_of_test_split(dataset, manifest)
    except (UserInputError, OSError, ValueError) as err:  # ValueError: pyarrow's ArrowInvalid (a corrupt shard)
        log.info("register: cannot compute the test-split digest of %s (%s)", dataset, err)
        return None


def _other_data(champion: Champion, report: EvaluationReport, who: str) -> str | None:
    """How the champion's test data differ from this report's, or None if they are the same.

    Same test-split digest = same data, whatever the fingerprints. Without a digest on either
    side (and none computable for the champion), the dataset fingerprints must be equal.
    """
    tags, ours = champion.tags, report.test_split_digest or ""
    theirs = tags.get("test_split_digest") or ""
    if ours and not theirs and tags.get("dataset_fingerprint") != report.dataset_fingerprint:
        theirs = _digest_of_recorded_dataset(tags) or ""  # same fingerprint: same build, no need to read it
    if ours and theirs:
        if theirs == ours:
            return None
        return f"{who} was scored on test split {_short(theirs)}, this on test split {_short(ours)}"
    if tags.get("dataset_fingerprint") != report.dataset_fingerprint:
        return (f"{who} was scored on dataset {_short(tags.get('dataset_fingerprint', ''))}, "
                f"this on {_short(report.dataset_fingerprint)}")
    return None


def _champion_not_comparable(
    champion: Champion, report: EvaluationReport, alias: str, across_datasets: bool = False
) -> tuple[str | None, str | None]:
    """(why the champion's score says nothing about this one, or None; how their data differ when
    `across_datasets` let that pass, or None)."""
    tags, who = champion.tags, f"{alias} version {champion.version}"
    if "classes" not in tags or "complete_split" not in tags:
        return f"{who} has no record of how it was scored (registered by an older train-food)", None
    other = _other_data(champion, report, who)
    if other is not None and not across_datasets:
        return other, None
    if tags["classes"] != _classes_tag(report.classes):
        return f"{who} has a different class list", None
    if tags.get("evaluated_split") != "test" or tags["complete_split"] != "true":
        return f"{who} was not scored on the whole test split", None
    return None, other


def decide(
    new: float, version: str, report: EvaluationReport, current: Champion | None, cfg: RegisterConfig
) -> Decision:
    """(promote, one-line reason, compared across datasets): the reason is recorded on the version, so a
    kept alias explains itself."""
    metric, alias = cfg.metric, cfg.alias
    unchanged = f"{alias} unchanged" if current else f"no {alias} set"
    if math.isnan(new):
        return Decision(False, f"version {version} has no finite {metric}; {unchanged}")
    why = _candidate_not_comparable(report)
    if why is not None:
        return Decision(False, f"not compared: version {version} is not promotable, {why}; {unchanged}")
    if current is None:
        return Decision(True, f"no {alias} yet: version {version} ({metric} {new:.4f}) becomes {alias}")
    why, other = _champion_not_comparable(current, report, alias, cfg.compare_across_datasets)
    if why is not None:
        return Decision(False, f"not compared: {why}; {alias} unchanged")
    across = other is not None
    note = f" (compared across datasets on request: {other})" if across else ""
    old_version, old = current.version, current.value
    if math.isnan(old):
        return Decision(True, f"{alias} version {old_version} has no {metric}; "
                              f"version {version} ({metric} {new:.4f}) replaces it{note}", across)
    better = new > old if cfg.greater_is_better else new < old
    if better:
        return Decision(True, f"version {version} ({metric} {new:.4f}) beats {alias} version {old_version} "
                              f"({old:.4f}){note}", across)
    return Decision(False, f"version {version} ({metric} {new:.4f}) does not beat {alias} version {old_version} "
                           f"({old:.4f}); {alias} stays on version {old_version}{note}", across)

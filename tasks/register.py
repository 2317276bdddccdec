"""Register an evaluated checkpoint in MLflow and move the `champion` alias only when it is better.

One MLflow run per registration holds the flattened training config (params), the evaluation's
scalar metrics, report.json and its figures (artifacts under `evaluation/`) and the model itself,
logged pickled (`serialization_format="pickle"`, so loading gives back the `LogitsModel` class,
not a torch.export graph) with a signature from a real test image and metadata carrying the
class names and image size. The new registry version gets lineage tags; the alias moves to it
only if it beats the current champion on `metric` (ties keep the champion).

Without `tracking_uri` or MLFLOW_TRACKING_URI everything stays in the workspace: an SQLite store
at `<workspace>/mlflow/mlflow.db` and artifacts under `<workspace>/mlflow/artifacts`, both absolute
(Ray changes the cwd). Nothing happens at import; call from one process (SQLite dislikes
concurrent writers, and "read champion, then set alias" is not atomic).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_jobs.data import IMAGENET_MEAN, IMAGENET_STD, ParquetImageDataset, eval_transform
from ray_jobs.errors import UserInputError, invalid_options
from ray_jobs.model import head_for_loss
from ray_jobs.predict import CheckpointModel, LogitsModel, model_from_checkpoint, using_tracking_uri
from tasks.evaluate import EvaluationReport, load_report

log = logging.getLogger(__name__)

__all__ = ["RegisterConfig", "RegistrationResult", "code_version", "default_tracking_uri", "ensure_experiment",
           "flatten_params", "parse_config", "register_model", "resolve_tracking_uri"]

_REPO = Path(__file__).resolve().parents[1]


class RegisterConfig(BaseModel):
    """Where to register and how to judge the new version. Defaults live here only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(default="food-classifier", min_length=1, description="Registered model name.")
    tracking_uri: str | None = Field(
        default=None, description="MLflow server or store; None: MLFLOW_TRACKING_URI, else SQLite in the workspace."
    )
    workspace: str = Field(default="workspace", description="Holds mlflow/mlflow.db and mlflow/artifacts by default.")
    experiment: str = Field(default="train-food", min_length=1, description="MLflow experiment of the runs.")
    metric: str = Field(default="test_acc1", description="Report metric that decides the champion.")
    greater_is_better: bool = Field(default=True, description="False for losses or compactness.")
    alias: str = Field(default="champion", min_length=1, description="Alias that marks the best version.")
    run_name: str | None = Field(default=None, description="MLflow run name; None: register-<training run>.")
    sweep: str | None = Field(default=None, description="Lineage: the sweep this checkpoint won, if any.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the run and the version.")


@dataclass(frozen=True)
class RegistrationResult:
    """The new version, whether it became champion and why (one line, fit for printing)."""

    version: str
    champion: bool
    reason: str
    run_id: str
    model_uri: str  # models:/<name>/<version>
    metric: float
    previous_champion: str | None


def parse_config(options: Mapping[str, Any]) -> RegisterConfig:
    """`RegisterConfig` from user options; a bad value is a one-line `UserInputError` naming the flag."""
    try:
        return RegisterConfig(**options)
    except ValidationError as err:
        raise invalid_options(err) from None


# ---------------------------------------------------------------- where MLflow writes


def _mlflow_dir(workspace: str | Path) -> Path:
    return Path(workspace).expanduser().resolve() / "mlflow"


def default_tracking_uri(workspace: str | Path = "workspace") -> str:
    """The embedded store: `sqlite:////abs/<workspace>/mlflow/mlflow.db` (absolute: Ray changes the cwd)."""
    return f"sqlite:///{_mlflow_dir(workspace) / 'mlflow.db'}"


def default_artifact_location(workspace: str | Path = "workspace") -> str:
    """`file:///abs/<workspace>/mlflow/artifacts`, set explicitly on the experiment."""
    return (_mlflow_dir(workspace) / "artifacts").as_uri()


def resolve_tracking_uri(
    tracking_uri: str | None = None, workspace: str | Path = "workspace", create: bool = True
) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else the workspace's SQLite store.

    `create=False` is for readers: a missing embedded store is a `UserInputError` instead of a new
    empty database (which would only fail later with a vaguer "model not found").
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = _mlflow_dir(workspace)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not (folder / "mlflow.db").is_file():
        raise UserInputError(f"no model registry at {folder / 'mlflow.db'}: run `train-food register` first, "
                             "or pass --workspace / --tracking-uri")
    return default_tracking_uri(workspace)


def ensure_experiment(client: Any, name: str, uri: str, workspace: str | Path) -> str:
    """The experiment's id, creating it (with an explicit artifact location for the embedded store)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    embedded = uri == default_tracking_uri(workspace)
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(workspace) if embedded else None)
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# ---------------------------------------------------------------- lineage


def code_version() -> str:
    """`git describe` of this checkout (commit, `-dirty` if modified), else the installed package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=_REPO, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"train-food {importlib.metadata.version('train-food')}"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"data": {"image_size": 32}}` -> `{"data.image_size": "32"}` for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_params(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def _requirements() -> list[str]:
    """Pinned runtime requirements (no `+cpu` local tags), so MLflow skips its slow inference subprocess."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in ("torch", "torchvision", "numpy")]


def _example_input(report: EvaluationReport) -> np.ndarray:
    """One real image of the evaluated split, preprocessed: float32 NCHW (batch of 1)."""
    try:
        split = ParquetImageDataset(report.dataset, report.split, eval_transform(image_size=report.image_size), limit=1)
        return split[0][0].unsqueeze(0).numpy().astype(np.float32)
    except (UserInputError, OSError, IndexError) as err:
        log.warning("register: dataset %s unreadable (%s); using a blank example input", report.dataset, err)
        return np.zeros((1, 3, report.image_size, report.image_size), dtype=np.float32)


def _check_same_checkpoint(state: dict[str, Any], report: EvaluationReport, checkpoint: Path) -> None:
    """The report must describe this checkpoint: same config, classes and epoch."""
    if (state["config"], list(state["classes"]), state.get("epoch")) != (
        report.train_config, report.classes, report.checkpoint_epoch
    ):
        raise UserInputError(
            f"report {report.path} was made from checkpoint {report.checkpoint}, not from {checkpoint} "
            "(config, classes or epoch differ): evaluate this checkpoint first"
        )


def _model_metadata(loaded: CheckpointModel, report: EvaluationReport) -> dict[str, Any]:
    """What a consumer of the registered model needs to preprocess inputs and read outputs."""
    return {
        "classes": loaded.classes,
        "image_size": report.image_size,
        "resize": round(report.image_size * 256 / 224),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "float32 NCHW RGB, resized, center-cropped and ImageNet-normalised (ray_jobs.data.eval_transform)",
        "output": "logits, one per class in `classes` order",
        "arch": loaded.config.model.arch,
        "feat_dim": loaded.config.model.feat_dim,
        "head": head_for_loss(loaded.config.loss.kind),
        "dataset_fingerprint": report.dataset_fingerprint,
    }


def _lineage(cfg: RegisterConfig, report: EvaluationReport, checkpoint: Path, value: float) -> dict[str, str]:
    """Tags on the run and the version: where the model came from and how it scored."""
    return {
        "dataset_fingerprint": report.dataset_fingerprint,
        "dataset": report.dataset,
        "train_run": report.train_run or "",
        "code_version": code_version(),
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": str(report.checkpoint_epoch),
        "evaluated_split": report.split,
        "metric_name": cfg.metric,
        cfg.metric: repr(value),
        **({"sweep": cfg.sweep} if cfg.sweep else {}),
        **cfg.tags,
    }


# ---------------------------------------------------------------- champion decision


def _champion(client: Any, name: str, alias: str, metric: str) -> tuple[str, float] | None:
    """(version, metric) of the current alias holder; None if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    value = client.get_run(holder.run_id).data.metrics.get(metric) if holder.run_id else None
    if value is None and metric in holder.tags:
        value = float(holder.tags[metric])
    return str(holder.version), float("nan") if value is None else float(value)


def _decide(new: float, version: str, current: tuple[str, float] | None, cfg: RegisterConfig) -> tuple[bool, str]:
    metric, alias = cfg.metric, cfg.alias
    if math.isnan(new):
        return False, f"version {version} has no finite {metric}; {alias} unchanged"
    if current is None:
        return True, f"no {alias} yet: version {version} ({metric} {new:.4f}) becomes {alias}"
    old_version, old = current
    if math.isnan(old):
        return True, (f"{alias} version {old_version} has no {metric}; "
                      f"version {version} ({metric} {new:.4f}) replaces it")
    better = new > old if cfg.greater_is_better else new < old
    if better:
        return True, f"version {version} ({metric} {new:.4f}) beats {alias} version {old_version} ({old:.4f})"
    return False, (f"version {version} ({metric} {new:.4f}) does not beat {alias} version {old_version} "
                   f"({old:.4f}); {alias} stays on version {old_version}")


# ---------------------------------------------------------------- the stage


def register_model(
    cfg: RegisterConfig, report: EvaluationReport | str | Path, checkpoint: str | Path | None = None
) -> RegistrationResult:
    """Log and register `checkpoint` (default: the report's) as a new version; maybe move the alias."""
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    report = report if isinstance(report, EvaluationReport) else load_report(report)
    checkpoint = Path(checkpoint or report.checkpoint).resolve()
    if cfg.metric not in report.metrics:
        raise UserInputError(f"report {report.path} has no metric {cfg.metric!r}; it has {sorted(report.metrics)}")
    value = float(report.metrics[cfg.metric])
    loaded = model_from_checkpoint(checkpoint)
    _check_same_checkpoint(loaded.state, report, checkpoint)

    serving = LogitsModel(loaded.net).eval()
    example = _example_input(report)
    with torch.no_grad():
        logits = serving(torch.from_numpy(example)).numpy()
    metadata = _model_metadata(loaded, report)
    lineage = _lineage(cfg, report, checkpoint, value)

    uri = resolve_tracking_uri(cfg.tracking_uri, cfg.workspace)
    with using_tracking_uri(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = ensure_experiment(client, cfg.experiment, uri, cfg.workspace)
        with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name or f"register-{report.train_run}",
                              tags=lineage) as run:
            mlflow.log_params(flatten_params(report.train_config))
            mlflow.log_metrics({k: v for k, v in {**report.checkpoint_metrics, **report.metrics}.items()
                                if math.isfinite(v)})
            mlflow.log_artifact(str(report.path), artifact_path="evaluation")
            for role in report.files:
                mlflow.log_artifact(str(report.file(role)), artifact_path="evaluation")
            info = mlflow.pytorch.log_model(
                serving,
                name="model",
                registered_model_name=cfg.model_name,
                serialization_format="pickle",
                signature=infer_signature(example, logits),
                input_example=example,
                metadata=metadata,
                pip_requirements=_requirements(),
            )
        version = str(info.registered_model_version)
        for key, tag in lineage.items():
            client.set_model_version_tag(cfg.model_name, version, key, tag)
        current = _champion(client, cfg.model_name, cfg.alias, cfg.metric)
        promote, reason = _decide(value, version, current, cfg)
        if current is not None:
            previous_fp = client.get_model_version(cfg.model_name, current[0]).tags.get("dataset_fingerprint")
            if previous_fp and previous_fp != report.dataset_fingerprint:
                reason += " (note: the two were evaluated on different datasets)"
        if promote:
            client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        client.set_model_version_tag(cfg.model_name, version, "registration", reason)
    return RegistrationResult(
        version=version,
        champion=promote,
        reason=reason,
        run_id=run.info.run_id,
        model_uri=f"models:/{cfg.model_name}/{version}",
        metric=value,
        previous_champion=current[0] if current else None,
    )

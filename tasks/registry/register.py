"""Register an evaluated checkpoint in MLflow; move the `champion` alias only on a fair improvement.

One MLflow run per registration holds the flattened training config (params), the evaluation's
scalar metrics, report.json and its figures (artifacts under `evaluation/`) and the model under
`model/`: `weights.pt`, the FoodNet state dict (tensors only, saved with `torch.save`), and an
`MLmodel` file without any flavour whose metadata holds what `ray_jobs.inference.loading` needs to rebuild
the net (training config, classes, image size, normalisation, arch, head) and whose signature
comes from a real test image. Nothing is pickled, so loading never runs code from the registry.
The checkpoint's open-set calibration (`calibration.json` and its `calibration.safetensors`) goes into `model/` too when
the report was made with it (same sha256), so a registered model flags unknown dishes as the
checkpoint does.

Whether the new version may take the alias is `tasks.registry.champion` (compare only like with like).
Logging, creating the version, reading the champion, deciding and moving the alias happen under
`tasks.registry.lock.promotion_lock`, one critical section per registration.

**Idempotent.** Each registration has an idempotency key (a hash of the report, the checkpoint
path and the registration settings) tagged on the run and the version. Registering the same
report again, e.g. a Prefect retry after a failed MLflow write, reuses the version with that key
and only finishes what was not done (the champion decision). Where MLflow writes: `store`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_jobs.config import TrainConfig
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibration_store import CALIBRATION_FILE, TENSORS_FILE, calibration_path
from ray_jobs.inference.loading import (
    MODEL_FORMAT,
    MODEL_WEIGHTS,
    CheckpointModel,
    LogitsModel,
    model_from_checkpoint,
)
from ray_jobs.inference.mlflow_uri import using_tracking_uri
from ray_jobs.model.inputs import eval_preprocessing, input_spec
from ray_jobs.model.foodnet import head_for_loss
from tasks.evaluation.report import EvaluationReport, load_report
from tasks.registry import champion
from tasks.registry.config import RegisterConfig, RegistrationResult
from tasks.registry.lock import promotion_lock
from tasks.registry.store import code_version, ensure_experiment, flatten_params, resolve_tracking_uri

log = logging.getLogger(__name__)

IDEMPOTENCY_TAG = "idempotency_key"


def _example_input(report: EvaluationReport, config: TrainConfig) -> np.ndarray:
    """One real image of the evaluated split, preprocessed as `config`'s net expects: float32 NCHW (batch of 1)."""
    try:
        split = ParquetImageDataset(report.dataset, report.split, eval_preprocessing(config), limit=1)
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


def _report_calibration(report: EvaluationReport, checkpoint: Path) -> dict[str, bytes]:
    """The files of the calibration the report was scored with, by name (none if it had none); refused if
    `calibration.json` changed since, or the tensor file no longer has the hash the JSON names."""
    if report.open_set is None:
        return {}
    path = calibration_path(checkpoint)
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != report.open_set.calibration_sha256:
        raise UserInputError(f"{path} is missing or changed since report {report.path} was made: evaluate this "
                             "checkpoint again")
    files = {CALIBRATION_FILE: data}
    expected = json.loads(data).get("tensors_sha256")
    if expected is not None:  # the current format; older calibrations are one JSON file
        tensors = path.with_name(TENSORS_FILE)
        files[TENSORS_FILE] = tensors.read_bytes() if tensors.is_file() else b""
        if hashlib.sha256(files[TENSORS_FILE]).hexdigest() != expected:
            raise UserInputError(f"{tensors} is missing or changed since report {report.path} was made: evaluate "
                                 "this checkpoint again")
    return files


def _model_metadata(loaded: CheckpointModel, report: EvaluationReport) -> dict[str, Any]:
    """What `ray_jobs.inference.loading` needs to rebuild the net, and a consumer to preprocess inputs and read outputs."""
    spec = input_spec(loaded.config)
    return {
        "format": MODEL_FORMAT,
        "weights": MODEL_WEIGHTS,
        "train_config": report.train_config,
        "classes": loaded.classes,
        "image_size": report.image_size,
        "resize": spec.resize,
        "interpolation": spec.interpolation,
        "mean": list(spec.norm.mean),
        "std": list(spec.norm.std),
        "input": "float32 NCHW RGB, resized (interpolation), center-cropped and normalised with mean/std (ray_jobs.data.transforms.eval_transform)",
        "output": "logits, one per class in `classes` order",
        "arch": loaded.config.model.arch,
        "feat_dim": loaded.config.model.feat_dim,
        "head": head_for_loss(loaded.config.loss.kind),
        "dataset_fingerprint": report.dataset_fingerprint,
        "open_set_calibration": CALIBRATION_FILE if report.open_set else None,
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


# ---------------------------------------------------------------- the stage


def idempotency_key(cfg: RegisterConfig, report: EvaluationReport, checkpoint: Path) -> str:
    """sha256 of what makes a registration request: the report's content, the checkpoint, the settings.

    The same report registered again (a retry) gets the same key; a new evaluation (new
    `created_at`) or other settings (metric, alias, tags) get a new one. Where the store is
    (`tracking_uri`, `workspace`) is not part of it.
    """
    request = {
        "report": json.loads(report.model_dump_json(exclude={"reports_dir"})),
        "checkpoint": str(checkpoint),
        "settings": cfg.model_dump(mode="json", exclude={"tracking_uri", "workspace"}),
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _versions_with_key(client: Any, name: str, key: str) -> list[Any]:
    """The versions one registration made (tag `idempotency_key`), oldest first; none when the model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{IDEMPOTENCY_TAG} = '{key}'")
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def _version_with_key(client: Any, name: str, key: str) -> Any | None:
    return next(iter(_versions_with_key(client, name, key)), None)


def _finished_run_with_key(client: Any, experiment_id: str, key: str) -> str | None:
    """A run of an earlier try that logged everything but failed before creating the version."""
    runs = client.search_runs(
        [experiment_id], f"tags.{IDEMPOTENCY_TAG} = '{key}' and attributes.status = 'FINISHED'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def _log_run(
    cfg: RegisterConfig, report: EvaluationReport, loaded: CheckpointModel, experiment_id: str, tags: dict[str, str],
    calibration: dict[str, bytes],
) -> str:
    """One MLflow run: params, metrics, the evaluation's files and the model (state dict + MLmodel)."""
    import mlflow
    from mlflow.models import Model, infer_signature

    serving = LogitsModel(loaded.net).eval()
    example = _example_input(report, loaded.config)
    with torch.no_grad():
        logits = serving(torch.from_numpy(example)).numpy()
    with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name or f"register-{report.train_run}",
                          tags=tags) as run:
        mlflow.log_params(flatten_params(report.train_config))
        mlflow.log_metrics({k: v for k, v in {**report.checkpoint_metrics, **report.metrics}.items()
                            if math.isfinite(v)})
        mlflow.log_artifact(str(report.path), artifact_path="evaluation")
        for role in report.files:
            mlflow.log_artifact(str(report.file(role)), artifact_path="evaluation")
        with tempfile.TemporaryDirectory(prefix="train-food-model-") as folder:
            torch.save(loaded.net.state_dict(), Path(folder) / MODEL_WEIGHTS)
            for name, data in calibration.items():
                (Path(folder) / name).write_bytes(data)
            Model(artifact_path="model", run_id=run.info.run_id, signature=infer_signature(example, logits),
                  metadata=_model_metadata(loaded, report)).save(Path(folder) / "MLmodel")
            mlflow.log_artifacts(folder, artifact_path="model")
    return run.info.run_id


def _create_version(client: Any, name: str, run_id: str, tags: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    try:
        client.create_model_version(name, source, run_id=run_id, tags=tags)
    except MlflowException:
        if _version_with_key(client, name, tags[IDEMPOTENCY_TAG]) is None:  # the server never created it
            raise
    return _one_version(client, name, tags[IDEMPOTENCY_TAG])


def _one_version(client: Any, name: str, key: str) -> str:
    """The version this registration created, and only one: when a create request's answer was lost and
    the HTTP client retried it, the server made two; the later ones are deleted (none has the alias yet)."""
    found = _versions_with_key(client, name, key)
    for extra in found[1:]:
        log.warning("register: deleting version %s, a duplicate of version %s made by a retried request",
                    extra.version, found[0].version)
        client.delete_model_version(name, str(extra.version))
    return str(found[0].version)


def register_model(
    cfg: RegisterConfig, report: EvaluationReport | str | Path, checkpoint: str | Path | None = None
) -> RegistrationResult:
    """Log and register `checkpoint` (default: the report's) as a new version; maybe move the alias.

    Registering the same report with the same settings again returns the same version (see
    `idempotency_key`), finishing the champion decision if an earlier try stopped before it.
    """
    from mlflow import MlflowClient

    report = report if isinstance(report, EvaluationReport) else load_report(report)
    checkpoint = Path(checkpoint or report.checkpoint).resolve()
    if cfg.metric not in report.metrics:
        raise UserInputError(f"report {report.path} has no metric {cfg.metric!r}; it has {sorted(report.metrics)}")
    value = float(report.metrics[cfg.metric])
    loaded = model_from_checkpoint(checkpoint)
    _check_same_checkpoint(loaded.state, report, checkpoint)
    calibration = _report_calibration(report, checkpoint)
    key = idempotency_key(cfg, report, checkpoint)
    tags = {**_lineage(cfg, report, checkpoint, value), **champion.comparability_tags(report), IDEMPOTENCY_TAG: key}

    uri = resolve_tracking_uri(cfg.tracking_uri, cfg.workspace)
    with using_tracking_uri(uri), promotion_lock(uri, cfg.model_name):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        existing = _version_with_key(client, cfg.model_name, key)
        if existing is not None:
            version, run_id = str(existing.version), existing.run_id
            if "registration" in existing.tags:  # an earlier try finished: report what it decided
                log.info("register: version %s already registered this report (key %s)", version, key[:12])
                return _result(cfg, version, run_id, value, existing.tags)
        else:
            experiment_id = ensure_experiment(client, cfg.experiment, uri, cfg.workspace)
            run_id = _finished_run_with_key(client, experiment_id, key) or _log_run(
                cfg, report, loaded, experiment_id, tags, calibration)
            version = _create_version(client, cfg.model_name, run_id, tags)
        current = champion.current_champion(client, cfg.model_name, cfg.alias, cfg.metric)
        if current is not None and current.version == version:  # an earlier try moved the alias, then failed
            verdict = champion.Decision(True, f"version {version} is {cfg.alias} (moved by an earlier try)")
            current = None
        else:
            verdict = champion.decide(value, version, report, current, cfg)
            if verdict.promote:
                client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        decision = {"promoted": str(verdict.promote).lower(), "previous_champion": current.version if current else "",
                    **({champion.ACROSS_TAG: "true"} if verdict.compared_across_datasets else {}),
                    "registration": verdict.reason}  # `registration` last: its presence means "decided"
        for name, tag in decision.items():
            client.set_model_version_tag(cfg.model_name, version, name, tag)
    return _result(cfg, version, run_id, value, decision)


def _result(cfg: RegisterConfig, version: str, run_id: str, value: float, tags: Mapping[str, str]) -> RegistrationResult:
    return RegistrationResult(
        version=version,
        champion=tags.get("promoted") == "true",
        reason=tags["registration"],
        run_id=run_id,
        model_uri=f"models:/{cfg.model_name}/{version}",
        metric=value,
        previous_champion=tags.get("previous_champion") or None,
    )

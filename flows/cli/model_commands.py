"""`train-food predict` (top-k classes of image files) and `train-food serve` (a model over HTTP)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.cli.command import Verb
from ray_jobs.inference.precision import InferencePrecision
from flows.cli.flags import Fields
from ray_jobs.errors import UserInputError
from ray_jobs.inference.detector_names import DetectorName


class PredictConfig(BaseModel):
    """What `predict` classifies and with which model; the console script's only config of its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: list[str] = Field(min_length=1, description="Image files.")
    model: str | None = Field(
        default=None, description="MLflow model URI or checkpoint path; None: models:/food-classifier@champion."
    )
    top_k: int = Field(default=5, ge=1, description="Classes to print per image.")
    detector: DetectorName | None = Field(
        default=None, description="Open-set detector that flags unknown dishes; None: the model calibration's default."
    )
    precision: InferencePrecision = Field(
        default="auto", description="Forward precision: fp32, bf16 (autocast), or auto (bf16 where native and "
        "calibrated, else fp32).")
    tracking_uri: str | None = Field(
        default=None, description="MLflow server or store; None: MLFLOW_TRACKING_URI, else the workspace SQLite."
    )
    workspace: str = Field(default="workspace", description="Workspace whose mlflow/ folder is the default store.")


def _predict_fields() -> Fields:
    return Fields(PredictConfig, positional=frozenset({"images"}),
                  metavars={"images": "IMAGE", "model": "URI_OR_CHECKPOINT", "top_k": "K"})


def _is_uri(model: str | None) -> bool:
    """None (the champion) or `scheme:...` that is not an existing path: resolve the MLflow store."""
    return model is None or (":" in model and not Path(model).exists())


def _predict(args: argparse.Namespace) -> int:
    from flows.cli.format import format_prediction
    from ray_jobs.inference.loading import load_model
    from ray_jobs.inference.predict import check_detector, predict_files

    cfg: PredictConfig = _predict_fields().validated(args)
    tracking_uri = None
    if _is_uri(cfg.model):
        from tasks.registry.store import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(cfg.tracking_uri, cfg.workspace, create=False)
    model = load_model(cfg.model, tracking_uri, cfg.precision)
    check_detector(model, cfg.detector)
    if model.calibration is None:
        print(f"train-food predict: note: model {model.source} has no open-set calibration (evaluate the checkpoint "
              "to add one): no photo is flagged unknown", file=sys.stderr)
    elif model.calibration.older:
        print(f"train-food predict: note: model {model.source} has an {model.calibration.describe()}",
              file=sys.stderr)
    predictions, failures = predict_files(model, cfg.images, top_k=cfg.top_k, detector=cfg.detector)
    for prediction in predictions:
        print(format_prediction(prediction))
    for failure in failures:
        print(f"train-food predict: error: {failure.error}", file=sys.stderr)
    return 2 if failures else 0  # a file it cannot read is bad input, as everywhere else


def _serve_fields() -> tuple[Fields, Fields, Fields]:
    """ServeConfig, the workspace of the default MLflow store, and the Ray cluster to join."""
    from ray_jobs.config import RunConfig
    from ray_jobs.serving.config import ServeConfig

    return (Fields(ServeConfig, metavars={"model": "URI_OR_CHECKPOINT"}),
            Fields(PredictConfig, only=frozenset({"workspace"}), metavars={"workspace": "DIR"}),
            Fields(RunConfig, only=frozenset({"ray_address"}), metavars={"ray_address": "HOST:PORT"}))


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for fields in _serve_fields():
        fields.add(parser)


def _serve(args: argparse.Namespace) -> int:
    from ray_jobs.inference.model_ref import check_model_source, parse_model_ref

    from ray_jobs.serving.config import TOKEN_ENV, ServeConfig

    serve_fields, workspace_fields, cluster_fields = _serve_fields()
    cfg = serve_fields.validated(args)
    if cfg.token is None and os.environ.get(TOKEN_ENV):
        cfg = _validated(ServeConfig, cfg.model_dump() | {"token": os.environ[TOKEN_ENV]}, f"${TOKEN_ENV}")
    if problem := cfg.exposure_problem():  # before Ray starts
        raise UserInputError(problem)
    cfg = _absolute(cfg, workspace_fields.value(args, "workspace"))
    serving = check_model_source(parse_model_ref(cfg.model), cfg.tracking_uri)
    if cfg.detector is not None:  # refuse here, in one line, rather than in every replica
        from ray_jobs.inference.loading import load_model
        from ray_jobs.inference.predict import check_detector

        check_detector(load_model(cfg.model, cfg.tracking_uri, cfg.precision), cfg.detector)

    from ray import serve

    from ray_jobs.cluster import ensure_ray
    from ray_jobs.serving.app import start

    ensure_ray(cluster_fields.value(args, "ray_address"))
    # What docker, systemd and Kubernetes send: stop as on Ctrl-C. Set after ray.init, whose own
    # handler for it would otherwise abort the process once ours has run.
    signal.signal(signal.SIGTERM, _interrupt)
    host, port = start(cfg)  # refused without deploying when Serve listens elsewhere: nothing of ours to delete
    try:
        guarded = ", POST /predict needs the bearer token" if cfg.token else ""
        print(f"serving {serving} at http://{host}:{port}/predict (health: /health{guarded}); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.delete(cfg.app_name)
    return 0  # returning lets Ray's exit handler stop the local cluster ensure_ray started, agents included


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _validated(config: type[BaseModel], values: dict[str, Any], where: str) -> Any:
    """Like `Fields.validated`, but the line never repeats the value: here it is a secret token."""
    try:
        return config.model_validate(values)
    except ValidationError as err:
        raise UserInputError(f"{where}: {err.errors()[0]['msg']}") from None


def _absolute(cfg: Any, workspace: str) -> Any:
    """What replicas need absolute (they run in another cwd): a checkpoint path, or a model URI's MLflow store."""
    if Path(cfg.model).exists():
        return cfg.model_copy(update={"model": str(Path(cfg.model).resolve())})
    if ":" not in cfg.model:  # neither a path nor a URI: check_model_source says so
        return cfg
    from tasks.registry.store import resolve_tracking_uri

    return cfg.model_copy(update={"tracking_uri": resolve_tracking_uri(cfg.tracking_uri, workspace, create=False)})


VERBS = (
    Verb(
        "predict",
        help="print the top-k classes of image files (exit 2 if any file could not be read)",
        description="Loads models:/food-classifier@champion unless --model names another MLflow model "
        "URI or a checkpoint directory/file.",
        add_flags=lambda parser: _predict_fields().add(parser),
        handler=_predict,
    ),
    Verb(
        "serve",
        help="serve a model over HTTP with Ray Serve: POST /predict (raw image bytes), GET /health",
        description="Loads models:/food-classifier@champion unless --model names another; follows the "
        "alias to new versions every --alias-poll-s seconds. Example: curl --data-binary @photo.jpg "
        "http://127.0.0.1:8000/predict. Unset options take the ServeConfig defaults (ray_jobs/serving/config.py).",
        add_flags=_add_serve_flags,
        handler=_serve,
    ),
)

"""Run a lambda/alpha sweep and log it to MLflow: one parent run, one nested run per trial.

Logging happens here, in the driver process, after Tune has finished: SQLite dislikes concurrent
writers, and the trial histories Tune keeps are complete by then. Logging is idempotent per sweep
name: a resumed sweep reuses its parent run and only adds the trials not logged yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ray_jobs.config import SweepConfig
from ray_jobs.inference.mlflow_uri import using_tracking_uri
from ray_jobs.training.progress import print_progress
from ray_jobs.tuning.sweep import SweepProgress, SweepResult, run_sweep
from tasks.registry.store import code_version, ensure_experiment, flatten_params, resolve_tracking_uri

SWEEP_TAG = "train_food.sweep"
TRIAL_TAG = "train_food.trial_id"
PARENT_TAG = "mlflow.parentRunId"


class Tracking(BaseModel):
    """Where sweep runs go: an MLflow URI (None: MLFLOW_TRACKING_URI, else the workspace SQLite).

    A pydantic model so `train-food tune` generates its MLflow flags (and their help) from it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str | None = Field(
        default=None, description="MLflow server or store; None: MLFLOW_TRACKING_URI, else the workspace SQLite."
    )
    workspace: str = Field(default="workspace", description="Workspace whose mlflow/ folder is the default store.")
    experiment: str = Field(default="train-food", description="MLflow experiment of the sweep's runs.")


DEFAULT_TRACKING = Tracking()


@dataclass(frozen=True)
class LoggedSweep:
    parent_run_id: str
    trial_run_ids: dict[str, str]


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def log_sweep(result: SweepResult, cfg: SweepConfig, tracking: Tracking = DEFAULT_TRACKING) -> LoggedSweep:
    """Parent run (sweep params, best trial, table and plot) with a nested run per trial."""
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking.tracking_uri, tracking.workspace)
    with using_tracking_uri(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment_id = ensure_experiment(client, tracking.experiment, uri, tracking.workspace)
        existing = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{result.name}'")
        parents = [run for run in existing if PARENT_TAG not in run.data.tags]
        logged = {run.data.tags.get(TRIAL_TAG): run.info.run_id for run in existing if PARENT_TAG in run.data.tags}
        tags = {SWEEP_TAG: result.name, "code_version": code_version()}
        parent_id = parents[0].info.run_id if parents else None
        with mlflow.start_run(run_id=parent_id, experiment_id=experiment_id, run_name=result.name,
                              tags=tags) as parent:
            if parent_id is None:
                mlflow.log_params(flatten_params(cfg.model_dump(mode="json", exclude={"train"})))
                mlflow.log_params(flatten_params(cfg.train.model_dump(mode="json"), "train."))
            best = {"best_val_acc1": result.best_val_acc1, "best_lam": result.best_config["lam"],
                    "best_alpha": result.best_config["alpha"], "trials": len(result.table),
                    "epochs_total": int(result.table["epochs"].sum())}
            mlflow.log_metrics(_finite(best))
            for path in result.outputs.values():
                mlflow.log_artifact(str(path), artifact_path="sweep")
            for row in result.table.itertuples(index=False):
                if row.trial_id in logged:
                    continue
                with mlflow.start_run(experiment_id=experiment_id, run_name=row.trial_id, nested=True,
                                      tags={**tags, TRIAL_TAG: row.trial_id, "status": row.status}) as child:
                    mlflow.log_params({"lam": row.lam, "alpha": row.alpha})
                    _log_history(result.histories.get(row.trial_id))
                    if row.checkpoint:
                        mlflow.set_tag("checkpoint", row.checkpoint)
                logged[row.trial_id] = child.info.run_id
    return LoggedSweep(parent_run_id=parent.info.run_id, trial_run_ids=logged)


def _log_history(history: pd.DataFrame | None) -> None:
    """Per-epoch metrics with `step=epoch`, so MLflow draws curves."""
    import mlflow

    if history is None:
        return
    numeric = history.select_dtypes("number")
    for record in numeric.to_dict("records"):
        epoch = int(record.get("epoch", record.get("training_iteration", 0)))
        metrics = {k: v for k, v in _finite(record).items() if k.startswith(("train_", "val_", "lr"))}
        mlflow.log_metrics(metrics, step=epoch)


def tune_and_log(
    cfg: SweepConfig,
    tracking: Tracking = DEFAULT_TRACKING,
    on_progress: Callable[[SweepProgress], None] = print_progress,
) -> tuple[SweepResult, LoggedSweep]:
    """The pipeline's tune stage: run (or resume) the sweep, then log it."""
    result = run_sweep(cfg, on_progress)
    return result, log_sweep(result, cfg, tracking)

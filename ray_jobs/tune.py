"""Ray Tune sweep over lambda and alpha: one TorchTrainer per trial (the Train V2 pattern).

Each trial is a function trainable that builds the same trainer as `train-food train`, with a
`TuneReportCallback` forwarding every epoch's metrics (and checkpoint path) to Tune. ASHA stops
weak trials on `val_acc1`. A sweep lives at `<storage>/<name>`: giving the same name again resumes
it, finishing missing trials without redoing finished ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_jobs.config import SweepConfig, TrainConfig
from ray_jobs.data import dataset_info
from ray_jobs.errors import UserInputError
from ray_jobs.tune_report import write_sweep_outputs
from ray_jobs.train import START_TIMEOUT_ENV, build_trainer, check_resources, ensure_ray, new_run_name, storage_root

METRIC = "val_acc1"
TRIAL_DRIVER_CPU = 0.01  # the trial function only drives its TorchTrainer; workers hold the real CPUs
TABLE_COLUMNS = ["trial_id", "lam", "alpha", "status", "epochs", "best_val_acc1", "val_compactness", "checkpoint"]


def _trial(config: dict[str, Any]) -> None:
    """One trial: the base training config with this trial's lambda and alpha."""
    train = dict(config["train"])
    train["loss"] = {**train["loss"], "lam": config["lam"], "alpha": config["alpha"]}
    cfg = TrainConfig.model_validate(train)
    context = tune.get_context()
    name = f"{context.get_experiment_name()}-{context.get_trial_id()}"
    build_trainer(cfg, config["classes"], name, callbacks=[TuneReportCallback()]).fit()


def search_space(cfg: SweepConfig) -> dict[str, Any]:
    """Grid when both grid lists are given, else log-uniform lambda and uniform alpha."""
    if cfg.grid:
        return {"lam": tune.grid_search(list(cfg.grid_lams)), "alpha": tune.grid_search(list(cfg.grid_alphas))}
    return {"lam": tune.loguniform(*cfg.lam_range), "alpha": tune.uniform(*cfg.alpha_range)}


def concurrency(cfg: SweepConfig) -> int:
    """Trials that fit side by side: the cluster's CPUs (or GPUs) over what one trial's workers take."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    scaling = cfg.train.scaling
    total = ray.cluster_resources()
    fits = total.get("CPU", 0.0) / (scaling.num_workers * scaling.cpus_per_worker + TRIAL_DRIVER_CPU)
    if scaling.use_gpu:
        fits = min(fits, total.get("GPU", 0.0) / (scaling.num_workers * scaling.gpus_per_worker))
    return max(int(math.floor(fits + 1e-9)), 1)


def _scheduler(cfg: SweepConfig) -> TrialScheduler:
    if cfg.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.optim.epochs,
        grace_period=min(cfg.grace_period, cfg.train.optim.epochs),
        reduction_factor=cfg.reduction_factor,
    )


@dataclass(frozen=True)
class SweepResult:
    """The sweep's outcome: every trial in `table`, the best one's config and checkpoint."""

    name: str
    path: str
    table: pd.DataFrame
    best_config: dict[str, float]
    best_checkpoint: str | None
    best_val_acc1: float
    histories: dict[str, pd.DataFrame]
    outputs: dict[str, Path]


def _trial_row(result: ray.tune.Result, max_epochs: int) -> dict[str, Any]:
    history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
    epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
    status = "error" if result.error else ("finished" if epochs >= max_epochs else "stopped early")
    row: dict[str, Any] = {
        "trial_id": Path(result.path).name if result.path else "",
        "lam": result.config["lam"],
        "alpha": result.config["alpha"],
        "status": status,
        "epochs": epochs,
        "best_val_acc1": float("nan"),
        "val_compactness": float("nan"),
        "checkpoint": None,
    }
    if METRIC in history and history[METRIC].notna().any():
        best = history.loc[history[METRIC].idxmax()]
        row |= {"best_val_acc1": float(best[METRIC]), "val_compactness": float(best["val_compactness"])}
        row["checkpoint"] = best.get(CHECKPOINT_PATH_KEY)
    return row


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep and write its table (CSV, Parquet) and plot (PNG) beside it."""
    info = dataset_info(cfg.train.data.dataset)
    ensure_ray(cfg.train.run.ray_address)
    check_resources(cfg.train)
    os.environ[START_TIMEOUT_ENV] = str(cfg.train.scaling.start_timeout_s)
    storage = storage_root(cfg.train.run.storage_path)
    name = cfg.name or new_run_name("sweep")
    path = f"{storage}/{name}"
    trainable = tune.with_resources(_trial, {"CPU": TRIAL_DRIVER_CPU})
    if tune.Tuner.can_restore(path):
        print(f"resuming sweep {name} from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    elif cfg.resume:
        raise UserInputError(f"--resume given but there is no sweep to resume at {path}")
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "train": cfg.train.model_dump(mode="json"),
                "classes": info.classes,
                **search_space(cfg),
            },
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=cfg.samples,
                scheduler=_scheduler(cfg),
                # Tune ignores TuneConfig.max_concurrent_trials when given a search_alg: set it here.
                search_alg=BasicVariantGenerator(max_concurrent=concurrency(cfg), random_state=cfg.train.run.seed),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=1,
                failure_config=tune.FailureConfig(max_failures=cfg.train.run.max_failures),
            ),
        )
    grid = tuner.fit()
    table = pd.DataFrame([_trial_row(result, cfg.train.optim.epochs) for result in grid], columns=TABLE_COLUMNS).sort_values(
        "best_val_acc1", ascending=False, na_position="last"
    )
    if table["best_val_acc1"].isna().all():
        errors = [str(result.error) for result in grid if result.error]
        raise RuntimeError(f"sweep {name}: no trial reported {METRIC}; first error: {errors[:1]}")
    best = table.iloc[0]
    histories = {
        Path(result.path).name: result.metrics_dataframe for result in grid if result.metrics_dataframe is not None
    }
    outputs = write_sweep_outputs(Path(storage_root(cfg.report_dir)) / name, table)
    return SweepResult(
        name=name,
        path=path,
        table=table.reset_index(drop=True),
        best_config={"lam": float(best["lam"]), "alpha": float(best["alpha"])},
        best_checkpoint=best["checkpoint"],
        best_val_acc1=float(best["best_val_acc1"]),
        histories=histories,
        outputs=outputs,
    )

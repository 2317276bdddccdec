"""Ray Tune sweep over lambda and alpha: one TorchTrainer per trial (the Train V2 pattern).

Each trial is a function trainable that builds the same trainer as `train-food train`, with a
`TuneReportCallback` forwarding every epoch's metrics (and checkpoint path) to Tune. ASHA stops
weak trials on `val_acc1`. A sweep lives at `<storage>/<name>`: giving the same name again resumes
it, finishing missing trials without redoing finished ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_jobs.config import SweepConfig, TrainConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import best_checkpoint, chosen_checkpoint
from ray_jobs.storage import absolute, is_uri
from ray_jobs.training.checkpointing import RunInputs
from ray_jobs.training.progress import epoch_line, print_progress
from ray_jobs.training.trainer import build_trainer, fit_retrying_start, new_run_name, prepare_driver
from ray_jobs.tuning.plot import write_sweep_outputs

METRIC = "val_acc1"
TRIAL_DRIVER_CPU = 0.01  # the trial function only drives its TorchTrainer; workers hold the real CPUs
TABLE_COLUMNS = ["trial_id", "lam", "alpha", "status", "epochs", "best_val_acc1", "val_compactness", "checkpoint"]


def _trial(config: dict[str, Any]) -> None:
    """One trial: the base training config with this trial's lambda and alpha (paths resolved by the driver)."""
    train = dict(config["train"])
    train["loss"] = {**train["loss"], "lam": config["lam"], "alpha": config["alpha"]}
    cfg = TrainConfig.model_validate(train)
    context = tune.get_context()
    name = trial_run_name(context.get_experiment_name(), context.get_trial_id())
    trainer = build_trainer(cfg, RunInputs(**config["run"]), name, callbacks=[TuneReportCallback()])
    outcome = fit_retrying_start(trainer, name).return_value
    if (outcome or {}).get("status") == "bad_input":
        raise UserInputError(outcome["error"])


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The Ray Train run of one trial, a folder under the sweep's storage path."""
    return f"{sweep}-{trial_id}"


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
    workers = scaling.max_workers  # an elastic trial may grow to its maximum
    fits = total.get("CPU", 0.0) / (workers * scaling.cpus_per_worker + TRIAL_DRIVER_CPU)
    if scaling.use_gpu:
        fits = min(fits, total.get("GPU", 0.0) / (workers * scaling.gpus_per_worker))
    return max(int(math.floor(fits + 1e-9)), 1)


def _scheduler(cfg: SweepConfig) -> TrialScheduler:
    if cfg.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # the epoch each report names: a resumed trial reports its real epoch
        max_t=cfg.train.optim.epochs,
        grace_period=min(cfg.grace_period, cfg.train.optim.epochs),
        reduction_factor=cfg.reduction_factor,
    )


@dataclass(frozen=True)
class SweepProgress:
    """One line for the user, after a trial's epoch or a trial's end, with the sweep's standing."""

    line: str
    trials_done: int
    trials_total: int
    best_val_acc1: float | None

    @property
    def fraction(self) -> float:
        return self.trials_done / self.trials_total if self.trials_total else 0.0


class _ProgressCallback(tune.Callback):
    """Runs in the driver, where Tune hears every trial's epoch: hands a `SweepProgress` to `on_progress`."""

    def __init__(self, on_progress: Callable[[SweepProgress], None], trials_total: int, epochs: int) -> None:
        self.on_progress, self.trials_total, self.epochs = on_progress, trials_total, epochs
        self.done: set[str] = set()
        self.best: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the sweep's state; a restored sweep prints its progress."""
        return self.__dict__ | {"on_progress": print_progress}

    def _tell(self, line: str) -> None:
        try:
            self.on_progress(SweepProgress(line, len(self.done), self.trials_total, self.best))
        except Exception as err:  # noqa: BLE001 - progress is for the user; the sweep goes on
            print(f"progress: could not report {line!r}: {err}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "val_acc1" not in result:
            return
        self.best = max(self.best or 0.0, float(result["val_acc1"]))
        left = float(result.get("time_this_iter_s", 0.0)) * (self.epochs - int(result["epoch"]))
        self._tell(f"trial {trial.trial_id}: {epoch_line(result, self.epochs, left)}")

    def _finished(self, trial: Any, how: str) -> None:
        self.done.add(trial.trial_id)
        best = "none yet" if self.best is None else f"{self.best:.3f}"
        self._tell(f"trial {trial.trial_id} {how}: {len(self.done)} of {self.trials_total} trials done, "
                   f"best val_acc1 {best}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, "ended")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, "failed")


def trial_count(cfg: SweepConfig) -> int:
    """Trials the sweep runs: `samples` draws, or `samples` passes over the grid."""
    return cfg.samples * (len(cfg.grid_lams) * len(cfg.grid_alphas) if cfg.grid else 1)


@dataclass(frozen=True)
class SweepResult:
    """The sweep's outcome: every trial in `table`, the best one's config and checkpoint (its last or its best
    by val_acc1, as `RunConfig.checkpoint_choice` says)."""

    name: str
    path: str
    table: pd.DataFrame
    best_config: dict[str, float]
    checkpoint: str | None
    best_val_acc1: float
    histories: dict[str, pd.DataFrame]
    outputs: dict[str, Path]


def _trial_row(result: ray.tune.Result, train: TrainConfig, sweep: str) -> dict[str, Any]:
    """One line of the trial table: the trial's best epoch (by val_acc1, which ranks the trials) and the
    checkpoint it hands on (`RunConfig.checkpoint_choice`), among those that still exist on storage."""
    max_epochs = train.optim.epochs
    history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
    epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
    status = "error" if result.error else ("finished" if epochs >= max_epochs else "stopped early")
    trial_id = str(history["trial_id"].iloc[-1]) if "trial_id" in history and len(history) else ""
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
    if not trial_id:
        return row
    run_dir = f"{train.run.storage_path}/{trial_run_name(sweep, trial_id)}"
    best, chosen = best_checkpoint(run_dir), chosen_checkpoint(run_dir, train.run.checkpoint_choice)
    if best is not None and chosen is not None:
        row |= {"best_val_acc1": best.score, "val_compactness": best.metrics.get("val_compactness", float("nan")),
                "checkpoint": chosen.path}
    return row


def run_sweep(cfg: SweepConfig, on_progress: Callable[[SweepProgress], None] = print_progress) -> SweepResult:
    """Run (or resume) the sweep and write its table (CSV, Parquet) and plot (PNG) beside it.

    Every trial epoch and trial end reaches `on_progress` in this process (not when resuming:
    Tune keeps a restored sweep's callbacks as they were, none).
    """
    if is_uri(cfg.train.run.storage_path):
        raise UserInputError(f"--storage-path {cfg.train.run.storage_path}: sweeps keep their trials on a path every "
                             "node reads (a shared volume); object-store URIs are for training runs only")
    train, run = prepare_driver(cfg.train, uses_ray=True)
    storage = train.run.storage_path
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
                "train": train.model_dump(mode="json"),
                "run": asdict(run),
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
                callbacks=[_ProgressCallback(on_progress, trial_count(cfg), train.optim.epochs)],
                failure_config=tune.FailureConfig(max_failures=cfg.train.run.max_failures),
            ),
        )
    grid = tuner.fit()
    rows = [_trial_row(result, train, name) for result in grid]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values(
        "best_val_acc1", ascending=False, na_position="last", kind="stable"
    )
    if table["best_val_acc1"].isna().all():
        errors = [str(result.error) for result in grid if result.error]
        bad_input = [error for error in errors if "UserInputError" in error]
        if bad_input:
            raise UserInputError(f"sweep {name}: every trial failed on bad input: {bad_input[0].splitlines()[-1]}")
        raise RuntimeError(f"sweep {name}: no trial left a checkpoint; first error: {errors[:1]}")
    best = table.iloc[0]
    histories = {
        Path(result.path).name: result.metrics_dataframe for result in grid if result.metrics_dataframe is not None
    }
    outputs = write_sweep_outputs(Path(absolute(cfg.report_dir)) / name, table)
    return SweepResult(
        name=name,
        path=path,
        table=table.reset_index(drop=True),
        best_config={"lam": float(best["lam"]), "alpha": float(best["alpha"])},
        checkpoint=best["checkpoint"],
        best_val_acc1=float(best["best_val_acc1"]),
        histories=histories,
        outputs=outputs,
    )

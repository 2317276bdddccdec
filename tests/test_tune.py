"""Ray Tune sweeps on the session's 2-CPU cluster: best-trial choice, ASHA early stops, resume, MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_train import tiny_config

from ray_jobs.config import LossConfig, SweepConfig
from ray_jobs.model.checkpoint import checkpoint_dir_name
from ray_jobs.tuning.sweep import _scheduler, concurrency
from tasks.tune import PARENT_TAG, SWEEP_TAG, Tracking, tune_and_log

pytestmark = pytest.mark.slow


def sweep_config(dataset: str, tmp_path: Path, *, epochs: int, lr: float = 0.05, limit: int = 32, **sweep) -> SweepConfig:
    train = tiny_config(dataset, tmp_path / "runs", workers=1, epochs=epochs, limit=limit, cpus_per_worker=0.5,
                        loss=LossConfig(kind="center"), lr=lr)
    return SweepConfig(train=train, report_dir=str(tmp_path / "sweeps"), **sweep)


def checkpointed_epochs(storage: Path, sweep: str) -> dict[str, int]:
    """Last epoch each trial's Train run has checkpointed (the workers write these synchronously)."""
    return {
        run.name: max((int(c.name.rsplit("_", 1)[1]) for c in run.glob("checkpoint_epoch_*")), default=0)
        for run in storage.glob(f"{sweep}-*")
    }


def test_sweep_of_three_trials_picks_the_best_and_logs_nested_mlflow_runs(ray_cluster, tiny_dataset, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them: trials run in other directories
    train = tiny_config(os.path.relpath(tiny_dataset), "runs", workers=1, epochs=2, limit=32, cpus_per_worker=0.5,
                        loss=LossConfig(kind="center"), keep_checkpoints=1)
    cfg = SweepConfig(train=train, report_dir="sweeps", num_samples=3, scheduler="none", name="three")
    assert concurrency(cfg) == 3, "0.5 CPU workers + 0.01 CPU drivers: three trials fit on 2 CPUs"
    tracking = Tracking(workspace=str(tmp_path / "ws"))
    result, logged = tune_and_log(cfg, tracking)

    table = result.table
    assert len(table) == 3 and set(table["status"]) == {"finished"}
    assert result.best_val_acc1 == table["best_val_acc1"].max()
    best_row = table.loc[table["best_val_acc1"].idxmax()]
    assert result.best_config == {"lam": best_row["lam"], "alpha": best_row["alpha"]}
    assert Path(result.checkpoint, "checkpoint.pt").is_file()
    for row in table.itertuples():  # each trial: ranked by its best epoch, handing on its last one (the default)
        assert Path(row.checkpoint).is_relative_to(tmp_path / "runs") and Path(row.checkpoint, "checkpoint.pt").is_file()
        assert row.best_val_acc1 == result.histories[row.trial_id]["val_acc1"].max()
        assert Path(row.checkpoint).name == checkpoint_dir_name(row.epochs) == checkpoint_dir_name(2)
    assert result.outputs["csv"].is_relative_to(tmp_path / "sweeps")
    assert all(1e-4 <= lam <= 1e-1 for lam in table["lam"]) and all(0.05 <= a <= 1.0 for a in table["alpha"])
    on_disk = pd.read_parquet(result.outputs["parquet"])
    assert len(pd.read_csv(result.outputs["csv"])) == 3 and list(on_disk["trial_id"]) == list(table["trial_id"])
    assert result.outputs["plot"].stat().st_size > 10_000

    import mlflow

    from tasks.registry.store import resolve_tracking_uri

    client = mlflow.MlflowClient(resolve_tracking_uri(None, tracking.workspace))
    runs = client.search_runs([client.get_experiment_by_name("train-food").experiment_id],
                              filter_string=f"tags.`{SWEEP_TAG}` = 'three'")
    children = [run for run in runs if run.data.tags.get(PARENT_TAG) == logged.parent_run_id]
    assert len(runs) == 4 and len(children) == 3
    history = client.get_metric_history(children[0].info.run_id, "val_acc1")
    assert [point.step for point in history] == [1, 2]
    assert {run.data.params["lam"] for run in children} == {str(lam) for lam in table["lam"]}


def test_asha_stops_a_weak_trial_early_and_later_trials_still_run(ray_cluster, colour_dataset, tmp_path):
    # One trial at a time, in grid order. At lr 0.01 lambda 1e-4 learns the colours fastest (val top-1
    # 0.67, 0.83, 1.0 in local mode); the center term of lambda 0.1 and 0.5 pulls the features together
    # and they lag behind it at ASHA's first rung (0.22 and 0.33).
    cfg = sweep_config(colour_dataset, tmp_path, epochs=3, lr=0.01, grid_lams=(1e-4, 0.1, 0.5), grid_alphas=(0.5,),
                       num_samples=1, scheduler="asha", grace_period=1, reduction_factor=2, max_concurrent_trials=1, name="asha")
    # The colour is the only signal here: RandAugment's colour operations, random erasing and smoothed targets
    # would blur the differences between trials this test needs (the old recipe's augmentation keeps it).
    train = cfg.train.model_copy(update={"data": cfg.train.data.model_copy(update={"augment": "crop_flip",
                                                                                  "random_erasing": 0.0}),
                                         "loss": cfg.train.loss.model_copy(update={"label_smoothing": 0.0})})
    cfg = cfg.model_copy(update={"train": train})
    assert _scheduler(cfg)._time_attr == "epoch", "ASHA's rungs count epochs, the unit of grace_period"
    result, _ = tune_and_log(cfg, Tracking(workspace=str(tmp_path / "ws")))
    table = result.table.sort_values("lam")
    assert list(table["lam"]) == [1e-4, 0.1, 0.5] and "error" not in set(table["status"])
    assert table.iloc[0]["status"] == "finished" and table.iloc[0]["epochs"] == 3
    stopped = table[table["status"] == "stopped early"]
    assert len(stopped) >= 1 and (stopped["epochs"] < 3).all()
    assert (table["epochs"] >= 1).all(), "the trials after a stop still ran"
    assert result.best_config["lam"] == 1e-4


def test_sweep_killed_after_first_trial_resumes_without_redoing_it(ray_cluster, tiny_dataset, tmp_path):
    # 128 rows an epoch: the killed trial's second epoch must outlast Ray's clean-up of the dead
    # driver's actors (seconds on a loaded machine), or it finishes before it is stopped.
    cfg = sweep_config(tiny_dataset, tmp_path, epochs=2, num_samples=3, scheduler="none",
                       max_concurrent_trials=1, name="killed", limit=128)
    storage = Path(cfg.train.run.storage_path)
    args = [sys.executable, "-m", "flows.cli", "tune", "--dataset", tiny_dataset, "--name", "killed",
            "--storage-path", str(storage), "--image-size", "32", "--batch-size", "16", "--loader-workers", "0",
            "--limit-per-split", "128", "--feat-dim", "32", "--warmup-epochs", "0", "--epochs", "2",
            "--cpus-per-worker", "0.5", "--start-timeout-s", "120", "--num-samples", "3", "--scheduler", "none",
            "--max-concurrent-trials", "1", "--report-dir", cfg.report_dir, "--workspace", str(tmp_path / "ws"),
            "--ray-address", ray_cluster.get_runtime_context().gcs_address]
    driver = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # the second trial's first epoch, on a machine that may be busy
    while time.monotonic() < deadline and sorted(checkpointed_epochs(storage, "killed").values()) != [1, 2]:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = checkpointed_epochs(storage, "killed")
    assert sorted(before.values()) == [1, 2], f"killed after the first trial, during the second: {before}"
    (finished_first,) = [run for run, epochs in before.items() if epochs == 2]
    first_checkpoint = storage / finished_first / "checkpoint_epoch_0002" / "checkpoint.pt"
    finished_at = first_checkpoint.stat().st_mtime_ns

    result, _ = tune_and_log(cfg.model_copy(update={"resume": True}), Tracking(workspace=str(tmp_path / "ws")))
    assert len(result.table) == 3 and set(result.table["status"]) == {"finished"}
    assert list(result.table["epochs"]) == [2, 2, 2]
    assert sorted(checkpointed_epochs(storage, "killed").values()) == [2, 2, 2]
    assert first_checkpoint.stat().st_mtime_ns == finished_at, "the trial finished before the kill was not redone"


def test_a_sweep_of_softmax_is_refused_it_has_no_knobs():
    from pydantic import ValidationError

    from flows.pipeline_config import PipelineConfig
    from ray_jobs.config import DataConfig, TrainConfig

    with pytest.raises(ValidationError, match="softmax does not have"):
        PipelineConfig(sweep=True, loss="softmax")
    with pytest.raises(ValidationError, match="softmax does not have"):
        SweepConfig(train=TrainConfig(data=DataConfig(dataset="unused"), loss=LossConfig(kind="softmax")))
    assert PipelineConfig(sweep=True, loss="contrastive_center").sweep

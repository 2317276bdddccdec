"""Sweep logging to MLflow without Ray: one parent run, nested trial runs, idempotent on resume."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from ray_jobs.config import DataConfig, LossConfig, SweepConfig, TrainConfig
from ray_jobs.tuning.plot import write_sweep_outputs
from ray_jobs.tuning.sweep import TABLE_COLUMNS, SweepResult
from tasks.registry.store import resolve_tracking_uri
from tasks.tune import PARENT_TAG, SWEEP_TAG, Tracking, log_sweep


def sweep_result(tmp_path: Path, trials: list[str]) -> SweepResult:
    rows = [
        {"trial_id": trial, "lam": 10.0 ** -(i + 2), "alpha": 0.5, "status": "finished", "epochs": 2,
         "best_val_acc1": (i + 1) / 10, "val_compactness": 1.0, "checkpoint": f"/ckpt/{trial}"}
        for i, trial in enumerate(trials)
    ]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("best_val_acc1", ascending=False)
    histories = {trial: pd.DataFrame({"epoch": [1, 2], "val_acc1": [0.05, 0.1], "train_loss": [2.3, 2.1]})
                 for trial in trials}
    best = table.iloc[0]
    return SweepResult(name="s1", path=str(tmp_path), table=table.reset_index(drop=True),
                       best_config={"lam": best["lam"], "alpha": best["alpha"]}, checkpoint=best["checkpoint"],
                       best_val_acc1=best["best_val_acc1"], histories=histories,
                       outputs=write_sweep_outputs(tmp_path / "report", table))


def test_resumed_sweep_reuses_its_parent_run_and_adds_only_new_trials(tmp_path):
    cfg = SweepConfig(train=TrainConfig(data=DataConfig(dataset="unused"), loss=LossConfig(kind="center")), name="s1")
    tracking = Tracking(workspace=str(tmp_path / "ws"))
    first = log_sweep(sweep_result(tmp_path, ["t0", "t1"]), cfg, tracking)
    second = log_sweep(sweep_result(tmp_path, ["t0", "t1", "t2"]), cfg, tracking)

    assert second.parent_run_id == first.parent_run_id
    assert {k: v for k, v in second.trial_run_ids.items() if k in first.trial_run_ids} == first.trial_run_ids
    client = mlflow.MlflowClient(resolve_tracking_uri(None, tracking.workspace))
    runs = client.search_runs([client.get_experiment_by_name("train-food").experiment_id],
                              filter_string=f"tags.`{SWEEP_TAG}` = 's1'")
    children = [run for run in runs if run.data.tags.get(PARENT_TAG) == first.parent_run_id]
    assert len(runs) == 4 and sorted(run.info.run_name for run in children) == ["t0", "t1", "t2"]
    assert [m.value for m in client.get_metric_history(children[0].info.run_id, "val_acc1")] == [0.05, 0.1]
    parent = client.get_run(first.parent_run_id)
    assert parent.data.metrics["best_val_acc1"] == 0.3 and parent.data.metrics["trials"] == 3

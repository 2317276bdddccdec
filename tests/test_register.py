"""Registration: lineage in MLflow, the champion alias moves only on improvement, alias loads the same model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from flows.cli import main
from ray_jobs.data import ParquetImageDataset, eval_transform
from ray_jobs.errors import UserInputError
from ray_jobs.predict import load_model, model_from_checkpoint
from tasks.evaluate import EvaluationReport
from tasks.register import (
    RegisterConfig,
    default_artifact_location,
    default_tracking_uri,
    register_model,
    resolve_tracking_uri,
)


def _with_metric(report: EvaluationReport, value: float) -> EvaluationReport:
    return report.model_copy(update={"metrics": {**report.metrics, "test_acc1": value}})


@pytest.fixture(scope="module")
def registry(evaluation, trained_checkpoint, tmp_path_factory):
    """Three versions of one checkpoint whose reports claim acc1 0.30, 0.25 (worse), 0.40 (better).

    Uses the embedded default store under a temp workspace, run from a temp cwd with no
    MLFLOW_TRACKING_URI, so the defaults and their lack of side effects are what is tested.
    """
    workspace = tmp_path_factory.mktemp("workspace")
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.chdir(cwd)
        cfg = RegisterConfig(workspace=str(workspace), sweep="sweep-test", tags={"owner": "tests"})
        results = [register_model(cfg, _with_metric(evaluation, v), trained_checkpoint) for v in (0.30, 0.25, 0.40)]
        env_after = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return {"workspace": workspace, "cwd": cwd, "results": results, "env_after": env_after,
            "uri": default_tracking_uri(workspace)}


def test_champion_moves_only_when_the_metric_improves(registry):
    from mlflow import MlflowClient

    first, worse, better = registry["results"]
    assert (first.version, first.champion, first.previous_champion) == ("1", True, None)
    assert "no champion yet" in first.reason
    assert (worse.version, worse.champion, worse.previous_champion) == ("2", False, "1")
    assert "does not beat champion version 1" in worse.reason and "stays on version 1" in worse.reason
    assert (better.version, better.champion, better.previous_champion) == ("3", True, "1")
    assert "beats champion version 1" in better.reason
    client = MlflowClient(registry["uri"])
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "3"
    assert client.get_model_version("food-classifier", "2").tags["registration"] == worse.reason


def test_ties_keep_the_champion(registry, evaluation, trained_checkpoint):
    cfg = RegisterConfig(tracking_uri=registry["uri"], workspace=str(registry["workspace"]))
    tie = register_model(cfg, _with_metric(evaluation, 0.40), trained_checkpoint)
    assert not tie.champion and tie.previous_champion == "3"
    lower_wins = cfg.model_copy(update={"metric": "test_ce_loss", "greater_is_better": False, "alias": "lowest-ce"})
    assert register_model(lower_wins, evaluation, trained_checkpoint).champion  # first holder of a new alias


def test_run_and_version_carry_lineage_params_metrics_and_artifacts(registry, evaluation):
    from mlflow import MlflowClient

    client = MlflowClient(registry["uri"])
    version = client.get_model_version("food-classifier", "3")
    tags = version.tags
    assert tags["dataset_fingerprint"] == evaluation.dataset_fingerprint
    assert tags["train_run"] == "tiny-eval" and tags["sweep"] == "sweep-test" and tags["owner"] == "tests"
    assert tags["test_acc1"] == "0.4" and tags["code_version"]
    run = client.get_run(version.run_id)
    assert run.data.params["model.feat_dim"] == "16" and run.data.params["data.image_size"] == "32"
    assert run.data.metrics["test_acc1"] == pytest.approx(0.40)
    assert "val_acc1" in run.data.metrics  # the checkpoint's training metrics come along
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {f"evaluation/{name}" for name in ("report.json", *evaluation.files.values())}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == default_artifact_location(registry["workspace"])


def test_embedded_store_is_absolute_and_nothing_leaks_into_cwd_or_env(registry, tmp_path, monkeypatch):
    workspace = registry["workspace"]
    assert registry["uri"] == f"sqlite:///{workspace.resolve()}/mlflow/mlflow.db"
    assert (workspace / "mlflow" / "mlflow.db").is_file() and (workspace / "mlflow" / "artifacts").is_dir()
    assert list(registry["cwd"].iterdir()) == [], "no mlflow.db or mlruns in the cwd"
    assert registry["env_after"] == {"MLFLOW_TRACKING_URI": None, "MLFLOW_REGISTRY_URI": None}
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/workspace/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("http://other:5000", tmp_path) == "http://other:5000"


def test_alias_loads_the_same_model_as_the_checkpoint(registry, trained_checkpoint, tiny_dataset):
    served = load_model("models:/food-classifier@champion", registry["uri"])
    reference = model_from_checkpoint(trained_checkpoint)
    assert served.classes == reference.classes and served.image_size == reference.config.data.image_size == 32
    split = ParquetImageDataset(tiny_dataset, "test", eval_transform(image_size=32), limit=16)
    images, _ = next(iter(DataLoader(split, batch_size=16)))
    with torch.no_grad():
        torch.testing.assert_close(served.module(images), reference.net(images)[1], rtol=1e-5, atol=1e-5)
    assert served.metadata["head"] == "linear" and served.metadata["arch"] == "resnet18"


def test_predict_cli_defaults_to_the_champion(registry, trained_checkpoint, sample_dir, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    image = str(next((sample_dir / "test" / "baklava").glob("*.jpg")))
    assert main(["predict", image, "--workspace", str(registry["workspace"]), "--top-k", "3"]) == 0
    from_registry = capsys.readouterr().out
    assert main(["predict", image, "--model", trained_checkpoint, "--top-k", "3"]) == 0
    assert capsys.readouterr().out == from_registry and from_registry.count("\n") == 4


def test_report_must_match_checkpoint_and_have_the_metric(evaluation, trained_checkpoint, tmp_path):
    cfg = RegisterConfig(tracking_uri=f"sqlite:///{tmp_path}/never.db")
    with pytest.raises(UserInputError, match="has no metric 'test_f2'"):
        register_model(cfg.model_copy(update={"metric": "test_f2"}), evaluation, trained_checkpoint)
    other_epoch = evaluation.model_copy(update={"checkpoint_epoch": 99})
    with pytest.raises(UserInputError, match="evaluate this checkpoint first"):
        register_model(cfg, other_epoch, trained_checkpoint)
    assert not Path(tmp_path / "never.db").exists()

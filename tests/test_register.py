"""Registration: lineage in MLflow, the champion alias moves only on improvement, alias loads the same model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from flows.cli.main import main
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.data.transforms import IMAGENET
from ray_jobs.errors import UserInputError
from ray_jobs.inference.loading import load_model, model_from_checkpoint
from ray_jobs.model.inputs import eval_preprocessing
from tasks.evaluation.report import EvaluationReport
from tasks.registry.config import RegisterConfig
from tasks.registry.register import register_model
from tasks.registry.store import default_artifact_location, default_tracking_uri, resolve_tracking_uri


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
    rerun = _with_metric(evaluation, 0.40).model_copy(update={"created_at": "2099-01-01T00:00:00+00:00"})
    tie = register_model(cfg, rerun, trained_checkpoint)  # a new evaluation (not a retry) with the champion's score
    assert not tie.champion and tie.previous_champion == "3"
    lower_wins = cfg.model_copy(update={"metric": "test_ce_loss", "greater_is_better": False, "alias": "lowest-ce"})
    assert register_model(lower_wins, evaluation, trained_checkpoint).champion  # first holder of a new alias


def test_a_tag_claiming_a_score_never_decides_the_champion(evaluation, trained_checkpoint, tmp_path):
    """The champion's score comes from its run's metrics: a tag that claims more (`--tag test_acc1=0.99`
    on the champion) or is not a number at all changes nothing."""
    from mlflow import MlflowClient

    cfg = RegisterConfig(workspace=str(tmp_path / "ws"), model_name="tagged")
    first = register_model(cfg.model_copy(update={"tags": {"test_acc1": "0.99"}}), _with_metric(evaluation, 0.30),
                           trained_checkpoint)
    client = MlflowClient(default_tracking_uri(tmp_path / "ws"))
    assert first.champion and client.get_model_version("tagged", "1").tags["test_acc1"] == "0.99"
    better = register_model(cfg, _with_metric(evaluation, 0.40), trained_checkpoint)
    assert better.champion and "beats champion version 1 (0.3000)" in better.reason
    client.set_model_version_tag("tagged", "2", "test_acc1", "not a number")
    worse = register_model(cfg, _with_metric(evaluation, 0.35), trained_checkpoint)
    assert not worse.champion and "does not beat champion version 2 (0.4000)" in worse.reason


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
    split = ParquetImageDataset(tiny_dataset, "test", eval_preprocessing(served.config), limit=16)
    images, _ = next(iter(DataLoader(split, batch_size=16)))
    with torch.no_grad():
        torch.testing.assert_close(served.module(images), reference.net(images)[1], rtol=1e-5, atol=1e-5)
    assert served.metadata["head"] == "linear" and served.metadata["arch"] == "resnet18"
    assert served.metadata["mean"] == list(IMAGENET.mean) and served.metadata["std"] == list(IMAGENET.std)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling runs a shell command
        return os.system, (f"touch {self.marker}",)


def test_crafted_weights_in_the_registry_are_refused_and_never_run(registry, tmp_path):
    from mlflow import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    source = MlflowClient(registry["uri"]).get_model_version("food-classifier", "2").source  # not the champion
    marker = tmp_path / "payload-ran"
    torch.save({"net.fc.weight": _Payload(marker)}, Path(local_file_uri_to_path(source)) / "weights.pt")
    with pytest.raises(UserInputError, match=r"^refused to load weights.pt of models:/food-classifier/2: "
                                             r"not a plain tensor file \(.*posix\.system.*\)$"):
        load_model("models:/food-classifier/2", registry["uri"])
    assert not marker.exists()


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


# ---------------------------------------------------------------- comparability


def _report_variant(report: EvaluationReport, value: float, stamp: str, **update) -> EvaluationReport:
    """Another evaluation of the same checkpoint (own `created_at`) with `value` as test top-1."""
    return _with_metric(report, value).model_copy(update={"created_at": stamp, **update})


def _fresh_cfg(tmp_path) -> RegisterConfig:
    return RegisterConfig(workspace=str(tmp_path / "ws"), tracking_uri=default_tracking_uri(tmp_path / "ws"))


def test_only_whole_test_split_scores_on_the_same_dataset_are_compared(evaluation, trained_checkpoint, tmp_path):
    from mlflow import MlflowClient

    assert evaluation.complete and not evaluation.cross_dataset and evaluation.split == "test"
    assert evaluation.train_dataset_fingerprint == evaluation.dataset_fingerprint
    cfg = _fresh_cfg(tmp_path)
    rows = evaluation.split_rows
    limited = _report_variant(evaluation, 0.9, "2099-01-01T00:00:01+00:00", limit=50,
                              counts={**evaluation.counts, "images": 50})
    first = register_model(cfg, limited, trained_checkpoint)
    assert not first.champion and first.previous_champion is None
    assert first.reason == (f"not compared: version 1 is not promotable, it was scored on 50 of the {rows} test "
                            "images (--limit 50); no champion set")
    other = "9f8e7d6c5b4a" + "0" * 52
    cross = _report_variant(evaluation, 0.9, "2099-01-01T00:00:02+00:00", cross_dataset=True, dataset_fingerprint=other)
    second = register_model(cfg, cross, trained_checkpoint)
    assert not second.champion and "not promotable, it was trained on dataset" in second.reason
    assert "scored on dataset 9f8e7d6c5b4a; no champion set" in second.reason

    whole = register_model(cfg, _report_variant(evaluation, 0.3, "2099-01-01T00:00:03+00:00"), trained_checkpoint)
    assert (whole.version, whole.champion) == ("3", True)
    # better score, but on another build of the dataset with another test split: not comparable
    other_split = "5a4b3c2d1e0f" + "0" * 52
    elsewhere = _report_variant(evaluation, 0.8, "2099-01-01T00:00:04+00:00",
                                dataset_fingerprint=other, train_dataset_fingerprint=other,
                                test_split_digest=other_split)
    moved = register_model(cfg, elsewhere, trained_checkpoint)
    assert not moved.champion and moved.previous_champion == "3"
    assert moved.reason == (f"not compared: champion version 3 was scored on test split "
                            f"{evaluation.test_split_digest[:12]}, this on test split 5a4b3c2d1e0f; champion unchanged")
    # a report made before test-split digests: only the dataset fingerprints can say it is the same data
    undigested = _report_variant(evaluation, 0.8, "2099-01-01T00:00:05+00:00",
                                 dataset_fingerprint=other, train_dataset_fingerprint=other, test_split_digest=None)
    moved = register_model(cfg, undigested, trained_checkpoint)
    assert not moved.champion and moved.previous_champion == "3"
    assert moved.reason == (f"not compared: champion version 3 was scored on dataset "
                            f"{evaluation.dataset_fingerprint[:12]}, this on 9f8e7d6c5b4a; champion unchanged")
    client = MlflowClient(cfg.tracking_uri)
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "3"
    tags = client.get_model_version("food-classifier", "1").tags
    assert tags["registration"] == first.reason and tags["complete_split"] == "false"
    tags = client.get_model_version("food-classifier", "3").tags
    assert (tags["complete_split"], tags["evaluated_split"]) == ("true", "test")
    assert json.loads(tags["classes"]) == evaluation.classes
    assert tags["dataset_fingerprint"] == evaluation.dataset_fingerprint
    assert tags["test_split_digest"] == evaluation.test_split_digest
    assert client.get_model_version("food-classifier", "5").tags["test_split_digest"] == ""


def test_val_split_and_champion_without_records_are_not_compared(evaluation):
    from tasks.registry.champion import Champion, Decision, decide

    cfg = RegisterConfig()
    val = evaluation.model_copy(update={"split": "val"})
    assert decide(0.9, "2", val, None, cfg) == Decision(
        False, "not compared: version 2 is not promotable, it was scored on the val split, not test; no champion set")
    legacy = Champion("1", 0.1, {"dataset_fingerprint": evaluation.dataset_fingerprint, "evaluated_split": "test"})
    promote, reason = decide(0.9, "2", evaluation, legacy, cfg)[:2]
    assert not promote and "champion version 1 has no record of how it was scored" in reason
    recorded = {**legacy.tags, "complete_split": "true", "classes": json.dumps(evaluation.classes[::-1])}
    promote, reason = decide(0.9, "2", evaluation, Champion("1", 0.1, recorded), cfg)[:2]
    assert not promote and "champion version 1 has a different class list" in reason
    recorded["classes"] = json.dumps(evaluation.classes)
    assert decide(0.9, "2", evaluation, Champion("1", 0.1, recorded), cfg)[0]


# ---------------------------------------------------------------- same data: the test split, not the build


def _ingest_sample(sample: Path, out: Path, **options) -> dict:
    """The sample ingested as conftest's `tiny_dataset` is (64 px), bar `options`; its manifest."""
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    cfg = IngestConfig(**{"src": str(sample), "out": str(out), "max_side": 64, "workers": 2, **options})
    return ingest(cfg).manifest


def _train_and_evaluate(dataset: str, folder: Path, name: str) -> tuple[EvaluationReport, str]:
    """conftest's tiny training (32 px, 64 images a split), 1 epoch on `dataset`; evaluated on its whole test split."""
    from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
    from ray_jobs.training.trainer import fit
    from tasks.evaluation.evaluate import evaluate_checkpoint
    from tasks.evaluation.report import EvaluateConfig

    cfg = TrainConfig(
        data=DataConfig(dataset=dataset, image_size=32, batch_size=16, loader_workers=0, limit_per_split=64),
        model=ModelConfig(arch="resnet18", pretrained=False, feat_dim=16),
        loss=LossConfig(kind="center", lam=0.01, alpha=0.5),
        optim=OptimConfig(name="sgd", lr=0.05, weight_decay=1e-4, epochs=1, warmup_epochs=0),
        scaling=ScalingConfig(num_workers=0),
        run=RunConfig(storage_path=str(folder / "runs"), name=name, seed=0),
    )
    checkpoint = fit(cfg).checkpoint
    assert checkpoint is not None
    reports = str(folder / "reports")
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=checkpoint, dataset=dataset, reports=reports))
    return report, checkpoint


@pytest.fixture(scope="module")
def reingested(sample_dir, tmp_path_factory):
    """The sample ingested again with `tiny_dataset`'s options by edited ingest code (another
    `ingest_code_version`, so another fingerprint), and a tiny model trained and evaluated on it."""
    import tasks.ingest.fingerprint as fingerprint_module

    folder = tmp_path_factory.mktemp("reingested")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fingerprint_module, "ingest_code_version", lambda: "edited-ingest-code")
        manifest = _ingest_sample(sample_dir, folder / "food-sample-64")
    report, checkpoint = _train_and_evaluate(str(folder / "food-sample-64"), folder, "tiny-reingested")
    return {"dataset": str(folder / "food-sample-64"), "manifest": manifest, "report": report, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def other_test_split(sample_dir, tmp_path_factory):
    """The sample with its images stored at 48 px, not 64: the same classes and test photos, other stored
    test images, so another test-split digest; and a tiny model trained and evaluated on it.

    (Another `seed` would not do: the sample has its own test/ folder, so no seed changes the test split.)
    """
    folder = tmp_path_factory.mktemp("other-test-split")
    manifest = _ingest_sample(sample_dir, folder / "food-sample-48", max_side=48)
    report, checkpoint = _train_and_evaluate(str(folder / "food-sample-48"), folder, "tiny-48")
    return {"manifest": manifest, "report": report, "checkpoint": checkpoint}


@pytest.mark.slow
def test_a_champion_from_before_an_ingest_code_change_is_compared_and_can_be_beaten(
    evaluation, trained_checkpoint, tiny_dataset, reingested, tmp_path
):
    """Edited ingest code re-ingests the same photos: a new fingerprint but the same test split, so
    a champion scored on the old build is compared with a version scored on the new one.

    Tiny models on real photos score near chance, so which of two real scores is higher is a coin
    toss. To show deterministically that the champion can be beaten, the first version (the real
    `tiny_dataset` checkpoint and evaluation) is registered with its report claiming a test top-1
    0.05 below the second version's real one; the second is registered with its real report.
    """
    from mlflow import MlflowClient

    from ray_jobs.dataset_format import read_manifest

    first_build, new = read_manifest(tiny_dataset), reingested["report"]
    assert reingested["manifest"]["fingerprint"] != first_build["fingerprint"]
    assert reingested["manifest"]["ingest_code_version"] == "edited-ingest-code"
    assert reingested["manifest"]["test_split_digest"] == first_build["test_split_digest"]
    assert new.dataset_fingerprint == new.train_dataset_fingerprint == reingested["manifest"]["fingerprint"]
    assert new.complete and not new.cross_dataset
    assert new.test_split_digest == evaluation.test_split_digest == first_build["test_split_digest"]

    cfg = _fresh_cfg(tmp_path)
    score = new.metrics["test_acc1"]
    old = register_model(cfg, _report_variant(evaluation, score - 0.05, "2099-01-04T00:00:00+00:00"),
                         trained_checkpoint)
    assert (old.version, old.champion) == ("1", True)
    beaten = register_model(cfg, new, reingested["checkpoint"])
    assert not beaten.reason.startswith("not compared")
    assert (beaten.version, beaten.champion, beaten.previous_champion) == ("2", True, "1")
    assert beaten.reason == f"version 2 (test_acc1 {score:.4f}) beats champion version 1 ({score - 0.05:.4f})"
    client = MlflowClient(cfg.tracking_uri)
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "2"
    for version, build in (("1", first_build), ("2", reingested["manifest"])):
        tags = client.get_model_version("food-classifier", version).tags
        assert tags["test_split_digest"] == first_build["test_split_digest"]
        assert tags["dataset_fingerprint"] == build["fingerprint"]
        assert "compared_across_datasets" not in tags


@pytest.mark.slow
def test_a_champion_tagged_before_digests_is_compared_while_its_dataset_is_still_there(
    evaluation, trained_checkpoint, tiny_dataset, reingested, tmp_path
):
    """A champion an older train-food registered has no `test_split_digest` tag (deleted here). While
    its `dataset` tag names a folder still holding the build it was scored on, its digest is computed
    from there (from the shards: this copy's manifest predates digests too); once the folder is gone
    the dataset fingerprints decide, as before."""
    import shutil

    from mlflow import MlflowClient

    old_build = tmp_path / "old-build"
    shutil.copytree(tiny_dataset, old_build)
    manifest = json.loads((old_build / "manifest.json").read_text())
    del manifest["test_split_digest"]
    (old_build / "manifest.json").write_text(json.dumps(manifest))
    legacy = _report_variant(evaluation, 0.1, "2099-01-05T00:00:00+00:00", dataset=str(old_build))
    stores = {"kept": _fresh_cfg(tmp_path / "kept"), "gone": _fresh_cfg(tmp_path / "gone")}
    for cfg in stores.values():
        assert register_model(cfg, legacy, trained_checkpoint).champion
        client = MlflowClient(cfg.tracking_uri)
        client.delete_model_version_tag("food-classifier", "1", "test_split_digest")
        tags = client.get_model_version("food-classifier", "1").tags
        assert "test_split_digest" not in tags and tags["dataset"] == str(old_build)

    candidate = _with_metric(reingested["report"], 0.9)
    kept = register_model(stores["kept"], candidate, reingested["checkpoint"])
    assert (kept.version, kept.champion, kept.previous_champion) == ("2", True, "1")
    assert kept.reason == "version 2 (test_acc1 0.9000) beats champion version 1 (0.1000)"

    shutil.rmtree(old_build)
    gone = register_model(stores["gone"], candidate, reingested["checkpoint"])
    assert (gone.version, gone.champion, gone.previous_champion) == ("2", False, "1")
    assert gone.reason == (f"not compared: champion version 1 was scored on dataset "
                           f"{evaluation.dataset_fingerprint[:12]}, this on "
                           f"{reingested['report'].dataset_fingerprint[:12]}; champion unchanged")


@pytest.mark.slow
def test_compare_across_datasets_compares_with_a_champion_scored_on_another_test_split(
    evaluation, trained_checkpoint, other_test_split, tmp_path
):
    from mlflow import MlflowClient

    new = other_test_split["report"]
    assert new.classes == evaluation.classes and new.complete and not new.cross_dataset
    assert new.test_split_digest == other_test_split["manifest"]["test_split_digest"] != evaluation.test_split_digest
    cfg = _fresh_cfg(tmp_path)
    assert register_model(cfg, _report_variant(evaluation, 0.5, "2099-01-06T00:00:00+00:00"),
                          trained_checkpoint).champion
    candidate = _with_metric(new, 0.6)
    splits = (f"champion version 1 was scored on test split {evaluation.test_split_digest[:12]}, "
              f"this on test split {new.test_split_digest[:12]}")
    refused = register_model(cfg, candidate, other_test_split["checkpoint"])
    assert (refused.version, refused.champion, refused.previous_champion) == ("2", False, "1")
    assert refused.reason == f"not compared: {splits}; champion unchanged"

    across = register_model(cfg.model_copy(update={"compare_across_datasets": True}), candidate,
                            other_test_split["checkpoint"])  # other settings: a new registration, not a retry
    assert (across.version, across.champion, across.previous_champion) == ("3", True, "1")
    assert across.reason == ("version 3 (test_acc1 0.6000) beats champion version 1 (0.5000) "
                             f"(compared across datasets on request: {splits})")
    client = MlflowClient(cfg.tracking_uri)
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "3"
    tags = client.get_model_version("food-classifier", "3").tags
    assert tags["compared_across_datasets"] == "true" and tags["registration"] == across.reason
    assert "compared_across_datasets" not in client.get_model_version("food-classifier", "2").tags


def test_same_data_rules_and_what_compare_across_datasets_still_checks(evaluation, tmp_path):
    """The decision alone, on hand-made champion tags: digests beat fingerprints, a champion's
    dataset that now holds another build is not read as its data, and the flag skips only the
    same-data check."""
    import shutil

    from tasks.registry.champion import Champion, Decision, decide

    cfg, across = RegisterConfig(), RegisterConfig(compare_across_datasets=True)
    digest, fingerprint = evaluation.test_split_digest, evaluation.dataset_fingerprint
    assert digest and fingerprint
    recorded = {"classes": json.dumps(evaluation.classes), "complete_split": "true", "evaluated_split": "test"}
    other = "ab" * 32
    # same digest, other fingerprint: compared; other digest, same fingerprint: the digest decides
    same_split = {**recorded, "dataset_fingerprint": other, "test_split_digest": digest}
    assert decide(0.9, "2", evaluation, Champion("1", 0.1, same_split), cfg)[0]
    same_build = {**recorded, "dataset_fingerprint": fingerprint, "test_split_digest": other}
    promote, reason, _ = decide(0.9, "2", evaluation, Champion("1", 0.1, same_build), cfg)
    assert not promote and reason.startswith("not compared: champion version 1 was scored on test split abababababab")

    # no digest tag: computed from the `dataset` tag only if that folder still holds the champion's build
    copy = tmp_path / "dataset"
    shutil.copytree(evaluation.dataset, copy)
    undigested = {**recorded, "dataset_fingerprint": fingerprint, "dataset": str(copy)}
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": other}))  # re-ingested in place
    report = evaluation.model_copy(update={"dataset_fingerprint": "cd" * 32, "train_dataset_fingerprint": "cd" * 32})
    promote, reason, _ = decide(0.9, "2", report, Champion("1", 0.1, undigested), cfg)
    assert not promote and reason == (f"not compared: champion version 1 was scored on dataset {fingerprint[:12]}, "
                                      "this on cdcdcdcdcdcd; champion unchanged")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert decide(0.9, "2", report, Champion("1", 0.1, undigested), cfg)[0]

    # the flag skips the same-data check only: classes, the whole test split, a promotable candidate still count
    elsewhere = {**recorded, "dataset_fingerprint": other, "test_split_digest": other}
    assert decide(0.9, "2", evaluation, Champion("1", 0.1, elsewhere), across)[::2] == (True, True)
    assert decide(0.05, "2", evaluation, Champion("1", 0.1, elsewhere), across)[::2] == (False, True)
    reversed_classes = {**elsewhere, "classes": json.dumps(evaluation.classes[::-1])}
    assert decide(0.9, "2", evaluation, Champion("1", 0.1, reversed_classes), across) == Decision(
        False, "not compared: champion version 1 has a different class list; champion unchanged")
    limited = {**elsewhere, "complete_split": "false"}
    assert decide(0.9, "2", evaluation, Champion("1", 0.1, limited), across) == Decision(
        False, "not compared: champion version 1 was not scored on the whole test split; champion unchanged")
    cross = evaluation.model_copy(update={"cross_dataset": True, "dataset_fingerprint": other})
    promote, reason, compared = decide(0.9, "2", cross, Champion("1", 0.1, elsewhere), across)
    assert (promote, compared) == (False, False) and "version 2 is not promotable" in reason
    same = {**recorded, "dataset_fingerprint": fingerprint, "test_split_digest": digest}
    assert decide(0.9, "2", evaluation, Champion("1", 0.1, same), across) == Decision(
        True, "version 2 (test_acc1 0.9000) beats champion version 1 (0.1000)")  # nothing crossed, nothing noted


# ---------------------------------------------------------------- retries


def test_registering_the_same_report_again_reuses_its_version(evaluation, trained_checkpoint, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    import tasks.registry.champion as champion

    cfg = _fresh_cfg(tmp_path)
    report = _report_variant(evaluation, 0.3, "2099-01-02T00:00:00+00:00")
    first = register_model(cfg, report, trained_checkpoint)
    again = register_model(cfg, report, trained_checkpoint)
    assert again == first and first.champion
    client = MlflowClient(cfg.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'food-classifier'")] == ["1"]

    # a retry after a failure between creating the version and deciding the alias
    better = _report_variant(evaluation, 0.6, "2099-01-02T00:00:01+00:00")
    decide, calls = champion.decide, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("tracking server went away")
        return decide(*args, **kwargs)

    monkeypatch.setattr(champion, "decide", fail_once)
    with pytest.raises(RuntimeError, match="went away"):
        register_model(cfg, better, trained_checkpoint)
    half = client.get_model_version("food-classifier", "2")
    assert "registration" not in half.tags and half.tags["idempotency_key"]
    retried = register_model(cfg, better, trained_checkpoint)
    assert (retried.version, retried.champion, retried.previous_champion) == ("2", True, "1")
    assert retried.run_id == half.run_id
    versions = client.search_model_versions("name = 'food-classifier'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert len(client.search_runs([client.get_run(half.run_id).info.experiment_id])) == 2
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "2"
    assert client.get_model_version("food-classifier", "2").tags["registration"] == retried.reason
    assert register_model(cfg, better, trained_checkpoint) == retried  # a third call changes nothing


# ---------------------------------------------------------------- the lock


_CHILD = r"""
import fcntl, pathlib, sys, time
import tasks.registry.champion as champion
import tasks.registry.register as register
from tasks.evaluation.report import EvaluationReport

report_file, checkpoint, workspace, role, signals = sys.argv[1:6]
signals = pathlib.Path(signals)
report = EvaluationReport.model_validate_json(pathlib.Path(report_file).read_text())

def wait_for(*names, timeout=240.0):
    end = time.monotonic() + timeout
    while not any((signals / name).exists() for name in names) and time.monotonic() < end:
        time.sleep(0.05)

if role == "slow":  # read the champion, decide, then wait until the other one is done or blocked on the lock
    decide = champion.decide
    def slow_decide(*args, **kwargs):
        decision = decide(*args, **kwargs)
        (signals / "slow-decided").touch()
        wait_for("fast-done", "fast-blocked")
        return decision
    champion.decide = slow_decide
else:  # start once the slow one holds its decision; say so when the lock makes us wait
    flock = fcntl.flock
    def signalling_flock(fd, operation):
        if operation == fcntl.LOCK_EX:
            try:
                return flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                (signals / "fast-blocked").touch()
        return flock(fd, operation)
    fcntl.flock = signalling_flock
    wait_for("slow-decided")
result = register.register_model(register.RegisterConfig(workspace=workspace), report, checkpoint)
(signals / f"{role}-done").touch()
print(result.version, result.champion, result.reason)
"""


def test_concurrent_registrations_end_with_the_better_one_as_champion(evaluation, trained_checkpoint, tmp_path):
    """Two processes, one store. The worse one reads "no champion", decides to take the alias and
    stalls; the better one starts then. Without the lock the better one also sees no champion, takes
    the alias, and the stalled worse one overwrites it. With the lock the better one waits, then
    finds the worse one as champion and beats it.
    """
    import subprocess
    import sys

    from mlflow import MlflowClient

    workspace, signals = tmp_path / "ws", tmp_path / "signals"
    signals.mkdir()
    procs = {}
    for role, value in (("slow", 0.2), ("fast", 0.6)):
        report_file = tmp_path / f"{role}.json"
        report_file.write_text(_report_variant(evaluation, value, f"2099-01-03T00:00:0{len(procs)}+00:00")
                               .model_dump_json())
        procs[role] = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(report_file), trained_checkpoint, str(workspace), role, str(signals)],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    outputs = {role: proc.communicate(timeout=600) for role, proc in procs.items()}
    for role, proc in procs.items():
        assert proc.returncode == 0, f"{role}: {outputs[role][1][-3000:]}"
    slow, fast = (outputs[role][0].split(maxsplit=2) for role in ("slow", "fast"))
    client = MlflowClient(default_tracking_uri(workspace))
    assert str(client.get_model_version_by_alias("food-classifier", "champion").version) == "2", (slow, fast)
    assert slow[:2] == ["1", "True"] and fast[:2] == ["2", "True"], (slow, fast)
    assert "beats champion version 1" in fast[2]
    assert (signals / "fast-blocked").exists(), "the second registration never waited for the lock"


def test_lock_file_sits_next_to_the_store_and_remote_stores_without_prefect_are_refused(tmp_path, monkeypatch):
    from tasks.registry.lock import _lock_file, promotion_lock

    assert _lock_file(f"sqlite:///{tmp_path}/mlflow/mlflow.db") == tmp_path / "mlflow" / "mlflow.db.lock"
    assert _lock_file(tmp_path.as_uri()) == tmp_path / ".train-food-registry.lock"
    assert _lock_file("http://mlflow.example:5000") is None and _lock_file("databricks") is None
    with promotion_lock(f"sqlite:///{tmp_path}/mlflow/mlflow.db", "food-classifier"):
        assert (tmp_path / "mlflow" / "mlflow.db.lock").is_file()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(UserInputError, match="no lock for the remote registry http://mlflow.example:5000: set "
                                             "PREFECT_API_URL"), promotion_lock("http://mlflow.example:5000", "m"):
        pass


@pytest.mark.slow
def test_remote_store_with_a_prefect_server_takes_a_concurrency_limit_of_one():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.testing.utilities import prefect_test_harness

    from tasks.registry.lock import promotion_lock

    name = "train-food-registry-food-classifier"

    @flow
    def hold_the_lock() -> tuple[int, int]:
        with promotion_lock("http://mlflow.example:5000", "food-classifier"):
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(name)
            return limit.limit, limit.active_slots

    with prefect_test_harness(server_startup_timeout=120):
        assert hold_the_lock() == (1, 1)  # created on first use
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
            client.delete_global_concurrency_limit_by_name(name)
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=5, active=False))
        assert hold_the_lock() == (1, 1)  # a limit someone loosened is put back to 1
        with promotion_lock("http://mlflow.example:5000", "food-classifier"):  # outside a flow, PREFECT_API_URL set
            with get_client(sync_client=True) as client:
                assert client.read_global_concurrency_limit_by_name(name).active_slots == 1

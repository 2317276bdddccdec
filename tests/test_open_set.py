"""Open-set rejection: thresholds accept the requested share, far photos are `unknown`, and the
calibration travels with the checkpoint, the evaluation report and the registered model."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from flows.cli.main import main
from ray_jobs.config import DataConfig, LossConfig, ModelConfig, TrainConfig
from ray_jobs.data.decode import read_image
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibrate import model_centers
from ray_jobs.inference.calibration_store import (
    CALIBRATION_FILE,
    calibration_document,
    calibration_path,
    read_calibration,
    write_calibration,
)
from ray_jobs.inference.loading import CheckpointModel, load_model, model_from_checkpoint
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.inference.open_set import (
    DISTANCES,
    Calibration,
    calibrate,
    center_distances,
    class_means,
    open_set_scores,
)
from ray_jobs.inference.predict import predict_files, predict_tensors
from ray_jobs.metrics import auroc
from ray_jobs.model.foodnet import build_model
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig
from tasks.registry.config import RegisterConfig
from tasks.registry.register import register_model
from tasks.registry.store import default_tracking_uri

# ---------------------------------------------------------------- synthetic features (exact)


def _two_classes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 0: 20 points at distances 1..20 from (0, 0); class 1: 40 points at 0.1..4.0 from (100, 0)."""
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    near0 = torch.stack([torch.zeros(20), torch.arange(1, 21).float()], dim=1)
    near1 = torch.stack([torch.full((40,), 100.0), torch.arange(1, 41).float() / 10], dim=1)
    labels = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    return torch.cat([near0, near1]), labels, centers


@pytest.mark.parametrize(("share", "expected"), [(0.95, [19.0, 3.8]), (0.5, [10.0, 2.0]), (1.0, [20.0, 4.0])])
def test_per_class_thresholds_accept_exactly_the_requested_share(share, expected):
    features, labels, centers = _two_classes()
    calibration = calibrate(features, centers, "center_loss", accept_share=share, distance="euclidean")
    # scales (lower medians) 10 and 2.0; factor = the 95% order statistic of distance / scale over all 60
    assert calibration.thresholds.tolist() == pytest.approx(expected)
    assert calibration.fallback_classes == [] and calibration.val_counts == [20, 40]
    scores = open_set_scores(features, calibration)
    assert scores.nearest.tolist() == labels.tolist()
    for cls, count in enumerate((20, 40)):
        accepted = int((~scores.unknown[labels == cls]).sum())
        assert accepted == math.ceil(share * count - 1e-9), cls
    assert float((~scores.unknown).float().mean()) == pytest.approx(share)


def test_classes_nearest_to_few_or_no_val_images_get_the_global_scale():
    features, _, centers = _two_classes()
    keep = torch.cat([torch.arange(3), torch.arange(20, 60)])  # class 0 keeps 3 images; class 2 has none
    centers = torch.cat([centers, torch.tensor([[0.0, 500.0]])])
    calibration = calibrate(features[keep], centers, "center_loss", 0.95, "euclidean", min_class_images=10)
    # every scale is 2.0 (the global lower median of {1, 2, 3, 0.1..4.0}, and class 1's of 0.1..4.0);
    # the factor is the 41st smallest of the 43 distances / 2.0: 3.8 / 2.0
    assert calibration.fallback_classes == [0, 2] and calibration.val_counts == [3, 40, 0]
    assert calibration.thresholds.tolist() == pytest.approx([3.8, 3.8, 3.8])


def test_fifteen_val_images_a_class_still_give_a_95_percent_rule():
    """8 classes of 15 val images: a per-class 95% order statistic would be each class's largest distance
    (all 120 accepted); one factor over all 120 accepts ceil(0.95 x 120) = 114 of them."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(8) * 50
    labels = torch.arange(8).repeat_interleave(15)
    features = centers[labels] + torch.randn(120, 8, generator=generator) * torch.linspace(0.5, 3.0, 8)[labels, None]
    for distance in DISTANCES:
        calibration = calibrate(features, centers, "center_loss", 0.95, distance)
        assert calibration.val_counts == [15] * 8 and calibration.fallback_classes == []
        assert int((~open_set_scores(features, calibration).unknown).sum()) == 114, distance
        if distance != "relative":  # positive distances: classes that are spread wider get wider thresholds
            assert calibration.thresholds[7] > 3 * calibration.thresholds[0], distance


def test_relative_thresholds_are_each_class_median_plus_one_margin():
    """Points on the line through each center: relative distance = -|c|^2 + 2 |c| u at u short of it.
    Class 0 (|c| 10): 20 points at -100 + k, k = 1..20 (median -90); class 1 (|c| 10): 40 points at
    -100 + k/10 (median -98). Minus its median: -9..10 and -1.9..2; the 57th smallest of those 60 is 7."""
    centers = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    u0, u1 = torch.arange(1, 21).double() / 20, torch.arange(1, 41).double() / 200
    features = torch.cat([torch.stack([10 - u0, torch.zeros(20, dtype=torch.double)], dim=1),
                          torch.stack([torch.zeros(40, dtype=torch.double), 10 - u1], dim=1)]).float()
    calibration = calibrate(features, centers, "center_loss", 0.95, "relative")
    assert calibration.thresholds.tolist() == pytest.approx([-83.0, -91.0], abs=1e-3)
    unknown = open_set_scores(features, calibration).unknown
    assert int((~unknown[:20]).sum()) == 17 and not unknown[20:].any()


def test_a_relative_fallback_class_is_measured_from_its_own_center():
    """Class 1 (|c| 2) has 3 val images, too few for its own median: it takes the overall median of
    `distance - (-|c|^2)` (9, over 1..20 from class 0 and 1, 2, 3 from class 1) from its own center's
    value -4, not the overall median distance (-88, set by class 0's longer center), which would
    reject its own photos. Margin: the 22nd smallest of the 23 `distance - typical` is 9."""
    centers = torch.tensor([[10.0, 0.0], [0.0, 2.0]])
    u0, v1 = torch.arange(1, 21).double() / 20, torch.arange(1, 4).double() / 4
    features = torch.cat([torch.stack([10 - u0, torch.zeros(20, dtype=torch.double)], dim=1),
                          torch.stack([torch.zeros(3, dtype=torch.double), 2 - v1], dim=1)]).float()
    calibration = calibrate(features, centers, "center_loss", 0.95, "relative", min_class_images=10)
    assert calibration.fallback_classes == [1] and calibration.val_counts == [20, 3]
    assert calibration.thresholds.tolist() == pytest.approx([-90.0 + 9, -4.0 + 9 + 9], abs=1e-3)
    unknown = open_set_scores(features, calibration).unknown
    assert int((~unknown[:20]).sum()) == 19 and not unknown[20:].any()


def test_relative_distance_puts_short_features_far_from_every_center():
    """||x - c||^2 - ||x||^2: a short feature pointing at a center is farther from it than a long one."""
    centers = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    probes = torch.tensor([[0.1, 0.0], [40.0, 0.0], [1.0, 1.0]])
    expected = [[3.6, 9.0], [-156.0, 9.0], [0.0, 3.0]]
    assert torch.allclose(center_distances(probes, centers, "relative"), torch.tensor(expected), atol=1e-5)
    # the nearest center is the Euclidean nearest one: both subtract the same ||x||^2 from a row
    assert torch.equal(center_distances(probes, centers, "relative").argmin(dim=1),
                       center_distances(probes, centers, "euclidean").argmin(dim=1))


def test_cosine_distance_is_the_angle_not_the_length():
    centers = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    probes = torch.tensor([[0.1, 0.0], [40.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    expected = [[0.0, 1.0], [0.0, 1.0], [1 - 2 ** -0.5, 1 - 2 ** -0.5], [2.0, 1.0]]
    assert torch.allclose(center_distances(probes, centers, "cosine"), torch.tensor(expected), atol=1e-6)
    assert center_distances(probes, centers, "euclidean")[1].tolist() == pytest.approx([38.0, math.hypot(40, 3)])


def test_points_far_from_every_center_are_unknown_and_near_ones_are_not():
    features, _, centers = _two_classes()
    calibration = calibrate(features, centers, "center_loss", distance="euclidean")
    probes = torch.tensor([[50.0, 1000.0], [-300.0, 0.0], [0.0, 0.5], [100.5, 0.0]])
    scores = open_set_scores(probes, calibration)
    assert scores.unknown.tolist() == [True, True, False, False]
    assert scores.nearest.tolist() == [0, 0, 0, 1]
    assert scores.distance.tolist() == pytest.approx([math.hypot(50, 1000), 300.0, 0.5, 0.5])
    assert scores.threshold.tolist() == pytest.approx([19.0, 19.0, 19.0, 3.8])


def test_softmax_centers_are_val_class_means_and_an_absent_class_is_never_nearest():
    features = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, 10.0]])
    means = class_means(features, torch.tensor([0, 0, 1]), 3)
    assert means[:2].tolist() == [[1.0, 1.0], [10.0, 10.0]] and torch.isnan(means[2]).all()
    calibration = calibrate(features, means, "val_means", distance="euclidean", min_class_images=1)
    assert calibration.fallback_classes == [2]
    assert open_set_scores(torch.tensor([[9.0, 9.0]]), calibration).nearest.tolist() == [1]


def test_centers_follow_the_loss(trained_checkpoint):
    center = model_from_checkpoint(trained_checkpoint)
    features, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    centers, kind = model_centers(center, features, labels)
    assert kind == "center_loss" and torch.equal(centers, center.state["objective"]["centers"])

    def rebuilt(loss: str, head: str) -> CheckpointModel:
        net = build_model(ModelConfig(arch="resnet18", pretrained=False, feat_dim=16), 3, head)
        config = TrainConfig(data=DataConfig(dataset="unused"), loss=LossConfig(kind=loss))
        return CheckpointModel(net=net, config=config, classes=["a", "b", "c"], state={})

    lgm = rebuilt("lgm", "lgm")
    centers, kind = model_centers(lgm, features, labels)
    assert kind == "lgm_means" and torch.equal(centers, lgm.net.head.means.detach())
    centers, kind = model_centers(rebuilt("softmax", "linear"), features, labels)
    assert kind == "val_means" and torch.allclose(centers, class_means(features, labels, 3))


def test_auroc_against_brute_force():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    generator = torch.Generator().manual_seed(0)
    known = torch.randint(0, 8, (50,), generator=generator).float()  # many ties
    unknown = torch.randint(0, 6, (30,), generator=generator).float()
    pairs = known.unsqueeze(1) - unknown.unsqueeze(0)
    brute = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()).item() / pairs.numel()
    assert auroc(known, unknown) == pytest.approx(brute)


# ---------------------------------------------------------------- files


def test_calibration_round_trips_through_its_file_and_refuses_another_model(tmp_path):
    features, _, centers = _two_classes()
    calibration = calibrate(features, centers, "center_loss")
    write_calibration(tmp_path, calibration_document(calibration, ["a", "b"], 3, "f" * 64))
    back = read_calibration(tmp_path, ["a", "b"], feat_dim=2, epoch=3)
    assert torch.equal(back.centers, calibration.centers) and torch.equal(back.thresholds, calibration.thresholds)
    assert back.to_dict() == calibration.to_dict() and back.distance == "relative"
    document = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    del document["calibration"]["distance"]  # as written before a choice of distance existed
    write_calibration(tmp_path, document)
    assert read_calibration(tmp_path, ["a", "b"], feat_dim=2, epoch=3).distance == "euclidean"
    (tmp_path / "uncalibrated").mkdir()
    assert read_calibration(tmp_path / "uncalibrated", ["a", "b"], 2) is None  # no file: no calibration
    with pytest.raises(UserInputError, match="made for other classes"):
        read_calibration(tmp_path, ["a", "c"], 2)
    with pytest.raises(UserInputError, match="made for epoch 3, the checkpoint is epoch 4"):
        read_calibration(tmp_path, ["a", "b"], 2, epoch=4)
    with pytest.raises(UserInputError, match="2-d, the model's features 16-d"):
        read_calibration(tmp_path, ["a", "b"], 16)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match=f"{CALIBRATION_FILE}: unusable open-set calibration"):
        read_calibration(tmp_path, ["a", "b"], 2)


@pytest.fixture(scope="module")
def photos(sample_dir) -> list[str]:
    return [str(p) for p in sorted((sample_dir / "test" / "apple_pie").glob("*.jpg"))[:3]]


def _copy_checkpoint(trained_checkpoint: str, folder: Path, calibration: Calibration | None) -> str:
    """The trained checkpoint in a new folder, with `calibration` (a hand-made one) or none at all."""
    shutil.copytree(trained_checkpoint, folder)
    calibration_path(folder).unlink()
    if calibration is not None:
        state = model_from_checkpoint(folder).state
        write_calibration(folder, calibration_document(calibration, list(state["classes"]), state["epoch"], ""))
    return str(folder)


def _with_thresholds(trained_checkpoint: str, value: float) -> Calibration:
    stored = load_model(trained_checkpoint).calibration
    return Calibration(centers=stored.centers, thresholds=torch.full_like(stored.thresholds, value),
                       accept_share=stored.accept_share, center_kind=stored.center_kind,
                       val_counts=stored.val_counts, fallback_classes=stored.fallback_classes,
                       distance=stored.distance)


def test_checkpoint_predictions_give_the_distance_to_the_nearest_center(trained_checkpoint, photos):
    model = load_model(trained_checkpoint)
    stored = json.loads(calibration_path(trained_checkpoint).read_text())["calibration"]
    assert model.calibration is not None and model.calibration.to_dict() == stored
    predictions, failures = predict_files(model, photos)
    assert not failures
    preprocess = eval_preprocessing(model.config)
    with torch.no_grad():
        features = model.net(torch.stack([preprocess(read_image(path)) for path in photos]))[0]
    assert model.calibration.distance == "relative"  # the default: ||x - c||^2 - ||x||^2
    x, c = features.double(), model.calibration.centers.double()
    distances = (x.unsqueeze(1) - c.unsqueeze(0)).pow(2).sum(dim=2) - x.pow(2).sum(dim=1, keepdim=True)
    for prediction, row in zip(predictions, distances, strict=True):
        assert prediction.distance == pytest.approx(row.min().item(), rel=1e-4, abs=1e-4)
        assert prediction.nearest == model.classes[int(row.argmin())]
        assert prediction.threshold == pytest.approx(model.calibration.thresholds[int(row.argmin())].item())
        assert prediction.unknown == (prediction.distance > prediction.threshold)
    decoded = predict_tensors(model, [read_image(path) for path in photos], names=photos)
    assert decoded == predictions


@pytest.mark.parametrize(("threshold", "word", "sign"), [(-1e6, "unknown", ">"), (1e6, "known", "<=")])
def test_predict_cli_says_unknown_beyond_the_threshold(trained_checkpoint, photos, tmp_path, capsys,
                                                        threshold, word, sign):
    checkpoint = _copy_checkpoint(trained_checkpoint, tmp_path / "ckpt", _with_thresholds(trained_checkpoint, threshold))
    assert main(["predict", *photos, "--model", checkpoint, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 3 * len(photos)
    expected = predict_files(load_model(checkpoint), photos, top_k=2)[0]
    for block, prediction in zip(range(0, len(lines), 3), expected, strict=True):
        assert lines[block] == prediction.path
        verdict = f"   {word} (nearest: {prediction.nearest}, distance {prediction.distance:.3f} {sign} {threshold:.3f})"
        assert lines[block + 1].startswith("  1. ") and lines[block + 1].endswith(verdict)
        assert prediction.unknown == (word == "unknown")


def test_old_checkpoint_without_calibration_still_predicts_and_says_so_once(trained_checkpoint, photos, tmp_path,
                                                                           capsys):
    checkpoint = _copy_checkpoint(trained_checkpoint, tmp_path / "old", None)
    model = load_model(checkpoint)
    assert model.calibration is None
    predictions, _ = predict_files(model, photos)
    assert all(not p.unknown and p.distance is None and p.nearest is None for p in predictions)
    assert main(["predict", *photos, "--model", checkpoint, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert err.count("has no open-set calibration") == 1 and err.count("\n") == 1
    assert "known" not in out and "distance" not in out and len(out.splitlines()) == 3 * len(photos)


# ---------------------------------------------------------------- evaluation and registry


def test_report_says_which_share_is_accepted_and_per_image_csv_agrees(evaluation, trained_checkpoint):
    summary = evaluation.open_set
    assert summary is not None and summary.center_kind == "center_loss" and summary.accept_share == 0.95
    with evaluation.file("per_image_csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == evaluation.counts["images"] == 160
    assert summary.accepted == sum(row["unknown"] == "false" for row in rows)
    assert evaluation.metrics["test_accepted_share"] == pytest.approx(summary.accepted / 160)
    for row in rows:
        assert (float(row["distance"]) > float(row["threshold"])) == (row["unknown"] == "true")
        assert float(row["threshold"]) == pytest.approx(summary.thresholds[row["nearest"]], rel=1e-5)


def test_val_images_are_accepted_at_the_requested_share(trained_checkpoint, tiny_dataset):
    """The stored calibration of the real trained checkpoint, applied to its own val split as
    `predict` applies it, accepts exactly ceil(0.95 x N) of the N val images."""
    from torch.utils.data import DataLoader

    from ray_jobs.data.parquet import ParquetImageDataset
    from ray_jobs.model.inputs import eval_preprocessing
    from ray_jobs.training.engine import predict

    loaded = model_from_checkpoint(trained_checkpoint)
    calibration = load_model(trained_checkpoint).calibration
    val = ParquetImageDataset(tiny_dataset, "val", eval_preprocessing(loaded.config))
    features, _, _ = predict(loaded.net, DataLoader(val, batch_size=64), torch.device("cpu"))
    assert len(features) == sum(calibration.val_counts) > 20
    assert 0 < len(calibration.fallback_classes) < 10  # some classes nearest to fewer than 10 val images
    accepted = int((~open_set_scores(features, calibration).unknown).sum())
    assert accepted == math.ceil(0.95 * len(features) - 1e-9)


@pytest.mark.slow
def test_registered_model_carries_the_calibration(evaluation, trained_checkpoint, photos, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = RegisterConfig(workspace=str(tmp_path / "ws"), model_name="open-set")
    result = register_model(cfg, evaluation, trained_checkpoint)
    served = load_model(result.model_uri, default_tracking_uri(cfg.workspace))
    local = load_model(trained_checkpoint)
    assert served.calibration is not None and served.calibration.to_dict() == local.calibration.to_dict()
    assert served.metadata["open_set_calibration"] == CALIBRATION_FILE
    assert predict_files(served, photos)[0] == predict_files(local, photos)[0]


@pytest.mark.slow
def test_register_refuses_a_calibration_changed_since_the_report(trained_checkpoint, tiny_dataset, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, checkpoint)
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), dataset=tiny_dataset,
                                                reports=str(tmp_path / "r"), accept_share=0.5, limit=20))
    assert report.open_set.accept_share == 0.5  # a new share recalibrates (and rewrites the file)
    assert read_calibration(checkpoint, report.classes, 16).accept_share == 0.5
    document = json.loads(calibration_path(checkpoint).read_text())
    document["calibration"]["thresholds"][0] += 1.0
    calibration_path(checkpoint).write_text(json.dumps(document))
    with pytest.raises(UserInputError, match="changed since report .* evaluate this checkpoint again"):
        register_model(RegisterConfig(workspace=str(tmp_path / "ws")), report, checkpoint)


def test_evaluating_with_another_distance_recalibrates_and_says_which(trained_checkpoint, tiny_dataset, tmp_path,
                                                                     capsys):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, checkpoint)
    relative = load_model(str(checkpoint)).calibration
    assert relative.distance == "relative"
    assert main(["evaluate", str(checkpoint), "--dataset", tiny_dataset, "--reports", str(tmp_path / "r"),
                 "--distance", "cosine"]) == 0
    assert "nearest class's cosine distance threshold" in capsys.readouterr().out
    cosine = load_model(str(checkpoint)).calibration
    assert cosine.distance == "cosine" and not torch.allclose(cosine.thresholds, relative.thresholds)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["open_set"]["distance"] == "cosine"

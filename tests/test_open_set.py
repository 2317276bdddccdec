"""Open-set rejection: every detector's threshold accepts the requested share of val photos, the
calibration is fit on eval-mode train features and travels with the checkpoint, the evaluation
report and the registered model; `--detector` picks another; an older calibration still loads."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from flows.cli.main import main
from ray_jobs.data.decode import read_image
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibrate import FIT_PHOTOS_PER_CLASS, fit_subset
from ray_jobs.inference.calibration_store import (
    CALIBRATION_FILE,
    LEGACY_FORMAT,
    TENSORS_FILE,
    calibration_path,
    read_calibration,
    write_calibration,
)
from ray_jobs.inference.detector_names import DETECTORS
from ray_jobs.inference.detectors import FitData, accept_threshold, choose_knn_k
from ray_jobs.inference.legacy_calibration import LEGACY_DETECTOR, LegacyCalibration
from ray_jobs.inference.loading import load_model, model_from_checkpoint
from ray_jobs.inference.open_set import DETECTOR_RANKING, fit_open_set
from ray_jobs.inference.predict import predict_files, predict_tensors
from ray_jobs.metrics import auroc
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.training.engine import predict
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig
from tasks.registry.config import RegisterConfig
from tasks.registry.register import register_model
from tasks.registry.store import default_tracking_uri

# ---------------------------------------------------------------- synthetic features (exact)


def _clusters(per_class: int, seed: int, classes: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """`classes` Gaussian clusters around scaled unit vectors, `per_class` points each."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = torch.eye(classes, dim)[labels] * 6 + torch.randn(len(labels), dim, generator=generator)
    return features, labels


def _fit_data(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> FitData:
    return FitData(features, features @ weight.T, labels, head_weight=weight, head_bias=torch.zeros(len(weight)))


def test_accept_threshold_is_the_order_statistic_that_accepts_at_least_the_share():
    scores = torch.arange(1, 21).double()  # 1..20, known when >= threshold
    assert accept_threshold(scores, 0.95) == 2.0  # ceil(19) = 19 accepted: 2..20
    assert accept_threshold(scores, 0.5) == 11.0 and accept_threshold(scores, 1.0) == 1.0
    assert accept_threshold(scores[:3], 0.95) == 1.0  # ceil(2.85) = 3 of 3
    with pytest.raises(ValueError, match="no scores"):
        accept_threshold(torch.empty(0), 0.95)


@pytest.mark.parametrize("share", [0.95, 0.8])
def test_every_detector_accepts_the_requested_share_of_its_val_photos(share):
    weight = torch.eye(4, 8) * 2
    train, val = _clusters(30, seed=0), _clusters(15, seed=1)
    calibration = fit_open_set(_fit_data(*train, weight), val[0], val[0] @ weight.T, val[1], share)
    assert set(calibration.detector_names) == set(DETECTORS) and calibration.default == DETECTOR_RANKING[0]
    assert (calibration.fit_photos, calibration.val_photos) == (120, 60)
    for name in DETECTORS:
        verdicts = calibration.judge(val[0], val[0] @ weight.T, name)
        assert verdicts.detector == name
        assert int((~verdicts.unknown).sum()) == math.ceil(share * 60 - 1e-9), name
        assert torch.equal(verdicts.unknown, verdicts.score < verdicts.threshold), name


def test_far_photos_are_flagged_and_the_default_is_the_best_ranked_detector_present():
    weight = torch.eye(4, 8) * 2
    train, val = _clusters(30, seed=0), _clusters(15, seed=1)
    far = torch.zeros(20, 8)
    far[:, 4:] = 6 + torch.randn(20, 4, generator=torch.Generator().manual_seed(2))  # outside the known subspace
    calibration = fit_open_set(_fit_data(*train, weight), val[0], val[0] @ weight.T, val[1])
    for name in ("center_distance", "mahalanobis", "rmd", "knn", "vim"):
        assert calibration.judge(far, far @ weight.T, name).unknown.all(), name
    without_vim = fit_open_set(_fit_data(*train, weight), val[0], val[0] @ weight.T, val[1],
                               names=tuple(name for name in DETECTORS if name != "vim"))
    assert without_vim.default == next(name for name in DETECTOR_RANKING if name != "vim")  # L-GM: no linear head
    with pytest.raises(ValueError, match="has no detector 'vim'"):
        without_vim.judge(far, far @ weight.T, "vim")


def test_knn_k_is_chosen_on_val_alone_and_never_beyond_the_bank():
    """10 train photos per class: the 20th or 50th neighbour lies in another class for every photo, so
    leaving a class out cannot tell it apart any more; the chosen k is one of those that can."""
    weight = torch.eye(4, 8)
    (features, labels), val = _clusters(10, seed=0), _clusters(15, seed=1)
    data = _fit_data(features, labels, weight)
    k = choose_knn_k(data, *val)
    assert k in (1, 5, 10)

    def loco(k: int) -> float:  # the rule, written out: mean AUROC of each val class against the others
        bank = F.normalize(features.double(), dim=1)
        query = F.normalize(val[0].double(), dim=1)
        values = []
        for c in range(4):
            score = -torch.cdist(query, bank[labels != c]).kthvalue(k, dim=1).values
            values.append(auroc(score[val[1] != c], score[val[1] == c]))
        return sum(values) / 4

    assert loco(k) == max(loco(choice) for choice in (1, 5, 10, 20))
    assert choose_knn_k(data, *val, choices=(50, 100)) == 1  # none fits a 30-photo bank: k = 1


def test_fit_subset_draws_at_most_the_cap_per_class_in_row_order():
    labels = torch.tensor([0] * 5 + [1] * 300 + [2] * 3)
    rows = fit_subset(labels, per_class=FIT_PHOTOS_PER_CLASS)
    assert rows == sorted(rows) and rows == fit_subset(labels)
    assert torch.bincount(labels[rows]).tolist() == [5, FIT_PHOTOS_PER_CLASS, 3]


# ---------------------------------------------------------------- files


def _synthetic_calibration():
    weight = torch.eye(4, 8) * 2
    train, val = _clusters(30, seed=0), _clusters(15, seed=1)
    return fit_open_set(_fit_data(*train, weight), val[0], val[0] @ weight.T, val[1]), val[0], val[0] @ weight.T


def test_calibration_round_trips_through_its_files_and_refuses_another_model(tmp_path):
    calibration, features, logits = _synthetic_calibration()
    classes = ["a", "b", "c", "d"]
    write_calibration(tmp_path, {"fp32": calibration}, classes, 3, "f" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CALIBRATION_FILE, TENSORS_FILE]
    back = read_calibration(tmp_path, classes, feat_dim=8, epoch=3)
    assert back.metadata() == calibration.metadata()
    for name in DETECTORS:  # the stored detector scores exactly as the fitted one, against the same threshold
        assert torch.equal(back.judge(features, logits, name).score, calibration.judge(features, logits, name).score)
    (tmp_path / "uncalibrated").mkdir()
    assert read_calibration(tmp_path / "uncalibrated", classes, 8) is None  # no file: no calibration
    with pytest.raises(UserInputError, match="made for other classes"):
        read_calibration(tmp_path, ["a", "b", "c", "e"], 8)
    with pytest.raises(UserInputError, match="made for epoch 3, the checkpoint is epoch 4"):
        read_calibration(tmp_path, classes, 8, epoch=4)
    with pytest.raises(UserInputError, match="does not fit a model with 4 classes and 16-d features"):
        read_calibration(tmp_path, classes, 16)
    tensors = tmp_path / TENSORS_FILE
    data = tensors.read_bytes()
    tensors.write_bytes(data[:-8] + bytes(byte ^ 0xFF for byte in data[-8:]))
    with pytest.raises(UserInputError, match=f"{TENSORS_FILE} does not match the hash"):
        read_calibration(tmp_path, classes, 8)
    tensors.unlink()
    with pytest.raises(UserInputError, match=f"cannot read .*{TENSORS_FILE}"):
        read_calibration(tmp_path, classes, 8)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(UserInputError, match=f"{CALIBRATION_FILE}: unusable open-set calibration"):
        read_calibration(tmp_path, classes, 8)


def test_a_calibration_made_before_a_detector_existed_keeps_its_default_and_refuses_the_new_one(tmp_path):
    """Calibrations stored before `mahalanobis_normalised` (8 detectors, default center_distance) still judge as made."""
    weight = torch.eye(4, 8) * 2
    train, val = _clusters(30, seed=0), _clusters(15, seed=1)
    before = tuple(name for name in DETECTORS if name != "mahalanobis_normalised")
    fitted = fit_open_set(_fit_data(*train, weight), val[0], val[0] @ weight.T, val[1], names=before)
    old = replace(fitted, default="center_distance")  # the first of the ranking those calibrations were made with
    assert DETECTOR_RANKING[0] == "mahalanobis_normalised"
    write_calibration(tmp_path, {"fp32": old}, ["a", "b", "c", "d"], 3, "f" * 64)
    back = read_calibration(tmp_path, ["a", "b", "c", "d"], feat_dim=8, epoch=3)
    assert back.default == "center_distance"
    assert back.judge(val[0], val[0] @ weight.T).detector == "center_distance"
    with pytest.raises(ValueError, match="has no detector 'mahalanobis_normalised'"):
        back.judge(val[0], val[0] @ weight.T, "mahalanobis_normalised")


def _legacy_document(classes: list[str], centers: list[list[float]], thresholds: list[float], epoch: int | None,
                     distance: str | None = "relative") -> dict:
    """A calibration as train-food wrote it before the detectors (format /1; `distance` absent in the oldest)."""
    calibration = {"centers": centers, "thresholds": thresholds, "accept_share": 0.95, "center_kind": "center_loss",
                   "val_counts": [10] * len(classes), "fallback_classes": []}
    if distance is not None:
        calibration["distance"] = distance
    return {"format": LEGACY_FORMAT, "classes": classes, "checkpoint_epoch": epoch, "dataset_fingerprint": "",
            "calibration": calibration}


def test_an_older_calibration_loads_judges_as_it_did_and_says_so(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(
        _legacy_document(["a", "b"], [[0.0, 0.0], [100.0, 0.0]], [19.0, 3.8], 3, distance=None)))
    legacy = read_calibration(tmp_path, ["a", "b"], feat_dim=2, epoch=3)
    assert isinstance(legacy, LegacyCalibration) and legacy.older and legacy.distance == "euclidean"
    assert "older calibration: euclidean distance" in legacy.describe()
    probes = torch.tensor([[50.0, 1000.0], [0.0, 18.0], [100.5, 0.0], [104.0, 0.0]])
    verdicts = legacy.judge(probes, torch.zeros(4, 2))
    assert verdicts.detector == LEGACY_DETECTOR and verdicts.unknown.tolist() == [True, False, False, True]
    assert verdicts.score.tolist() == pytest.approx([-math.hypot(50, 1000), -18.0, -0.5, -4.0])
    assert verdicts.threshold.tolist() == pytest.approx([-19.0, -19.0, -3.8, -3.8])
    with pytest.raises(ValueError, match="older calibration.*evaluate the checkpoint again"):
        legacy.judge(probes, torch.zeros(4, 2), "vim")


# ---------------------------------------------------------------- the trained checkpoint


@pytest.fixture(scope="module")
def photos(sample_dir) -> list[str]:
    return [str(p) for p in sorted((sample_dir / "test" / "apple_pie").glob("*.jpg"))[:3]]


def _copy_checkpoint(trained_checkpoint: str, folder: Path, calibrated: bool = True) -> str:
    shutil.copytree(trained_checkpoint, folder)
    if not calibrated:
        for path in (calibration_path(folder), calibration_path(folder).with_name(TENSORS_FILE)):
            path.unlink()
    return str(folder)


def test_the_detectors_are_fit_on_eval_mode_train_features_of_the_kept_model(trained_checkpoint, tiny_dataset):
    """The stored KNN bank is exactly the normalised features of the train photos through the eval
    preprocessing (no augmentation) of the checkpoint's saved model, in fp32."""
    loaded = model_from_checkpoint(trained_checkpoint)
    train = ParquetImageDataset(tiny_dataset, "train", eval_preprocessing(loaded.config))
    features, _, _ = predict(loaded.net, DataLoader(Subset(train, fit_subset(train.labels)), batch_size=64),
                             torch.device("cpu"))
    calibration = load_model(trained_checkpoint, precision="fp32").calibration
    assert calibration.precision == "fp32" and calibration.fit_photos == len(features)
    bank = calibration.detectors["knn"].tensors["bank"]
    torch.testing.assert_close(bank, F.normalize(features.double(), dim=1).float().double(), atol=1e-6, rtol=0)


def test_val_photos_are_accepted_at_the_requested_share_by_every_detector(trained_checkpoint, tiny_dataset):
    loaded = model_from_checkpoint(trained_checkpoint)
    calibration = load_model(trained_checkpoint, precision="fp32").calibration
    val = ParquetImageDataset(tiny_dataset, "val", eval_preprocessing(loaded.config))
    features, logits, _ = predict(loaded.net, DataLoader(val, batch_size=64), torch.device("cpu"))
    assert len(features) == calibration.val_photos > 20
    for name in calibration.detector_names:
        accepted = int((~calibration.judge(features, logits, name).unknown).sum())
        assert accepted == math.ceil(0.95 * len(features) - 1e-9), name


def test_checkpoint_predictions_carry_the_default_detector_and_another_on_request(trained_checkpoint, photos):
    model = load_model(trained_checkpoint, precision="fp32")
    predictions, failures = predict_files(model, photos)
    assert not failures
    preprocess = eval_preprocessing(model.config)
    with torch.no_grad():
        features, logits = model.net(torch.stack([preprocess(read_image(path)) for path in photos]))
    for name in (None, "knn", "msp"):
        expected = model.calibration.judge(features, logits, name)
        got = predict_files(model, photos, detector=name)[0]
        assert [p.detector for p in got] == [expected.detector] * len(photos)
        assert [p.score for p in got] == pytest.approx(expected.score.tolist(), rel=1e-4, abs=1e-4)
        assert all(p.unknown == (p.score < p.threshold) for p in got)
    assert predictions[0].detector == model.calibration.default
    assert predict_tensors(model, [read_image(path) for path in photos], names=photos) == predictions


@pytest.mark.parametrize(("threshold", "word", "sign"), [(1e6, "unknown", "<"), (-1e6, "known", ">=")])
def test_predict_cli_says_unknown_below_the_threshold(trained_checkpoint, photos, tmp_path, capsys,
                                                      threshold, word, sign):
    checkpoint = _copy_checkpoint(trained_checkpoint, tmp_path / "ckpt")
    document = json.loads(calibration_path(checkpoint).read_text())
    document["calibration"]["detectors"]["energy"]["threshold"] = threshold
    calibration_path(checkpoint).write_text(json.dumps(document))
    assert main(["predict", *photos, "--model", checkpoint, "--top-k", "2", "--detector", "energy",
                 "--precision", "fp32"]) == 0  # the fp32 calibration, edited above
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 3 * len(photos)
    expected = predict_files(load_model(checkpoint, precision="fp32"), photos, top_k=2, detector="energy")[0]
    for block, prediction in zip(range(0, len(lines), 3), expected, strict=True):
        assert lines[block] == prediction.path
        verdict = f"   {word} (energy score {prediction.score:.3f} {sign} {threshold:.3f})"
        assert lines[block + 1].startswith("  1. ") and lines[block + 1].endswith(verdict)
        assert prediction.unknown == (word == "unknown")


def test_an_unknown_detector_name_is_refused_by_the_flag(trained_checkpoint, photos, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse's choices: usage and one error line
        main(["predict", *photos, "--model", trained_checkpoint, "--detector", "odin"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--detector" in err and "invalid choice: 'odin'" in err


def test_a_checkpoint_with_an_older_calibration_predicts_and_says_what_it_uses(trained_checkpoint, photos, tmp_path,
                                                                               capsys):
    checkpoint = _copy_checkpoint(trained_checkpoint, tmp_path / "old", calibrated=False)
    state = model_from_checkpoint(checkpoint).state
    classes = list(state["classes"])
    centers = torch.randn(len(classes), 16, generator=torch.Generator().manual_seed(0)).tolist()
    calibration_path(checkpoint).write_text(json.dumps(
        _legacy_document(classes, centers, [1e9] * len(classes), state["epoch"])))
    model = load_model(checkpoint)
    assert model.calibration.older
    predictions, _ = predict_files(model, photos)
    assert all(p.detector == LEGACY_DETECTOR and not p.unknown for p in predictions)
    assert main(["predict", *photos, "--model", checkpoint, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert err.count("has an older calibration: relative distance") == 1 and err.count("\n") == 1
    assert main(["predict", *photos, "--model", checkpoint, "--detector", "vim"]) == 2
    err = capsys.readouterr().err
    assert "--detector vim" in err and "evaluate the checkpoint again" in err and err.count("\n") == 1


def test_a_checkpoint_without_calibration_predicts_and_says_so_once(trained_checkpoint, photos, tmp_path, capsys):
    checkpoint = _copy_checkpoint(trained_checkpoint, tmp_path / "none", calibrated=False)
    model = load_model(checkpoint)
    assert model.calibration is None
    predictions, _ = predict_files(model, photos)
    assert all(not p.unknown and p.score is None and p.detector is None for p in predictions)
    assert main(["predict", *photos, "--model", checkpoint, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert err.count("has no open-set calibration") == 1 and err.count("\n") == 1
    assert "known" not in out and "score" not in out and len(out.splitlines()) == 3 * len(photos)


# ---------------------------------------------------------------- evaluation and registry


def test_report_names_the_detector_and_per_image_csv_agrees(evaluation):
    summary = evaluation.open_set
    default = DETECTOR_RANKING[0]
    assert summary is not None and summary.detector == default and summary.accept_share == 0.95
    assert set(summary.detectors) == set(DETECTORS) and summary.description.startswith(f"detector {default}, threshold")
    with evaluation.file("per_image_csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == evaluation.counts["images"] == 160
    assert summary.accepted == sum(row["unknown"] == "false" for row in rows)
    assert evaluation.metrics["test_accepted_share"] == pytest.approx(summary.accepted / 160)
    assert {row["detector"] for row in rows} == {default} and len({row["threshold"] for row in rows}) == 1
    for row in rows:
        assert (float(row["score"]) < float(row["threshold"])) == (row["unknown"] == "true")


def test_evaluate_judges_with_the_named_detector_without_refitting(trained_checkpoint, tiny_dataset, tmp_path,
                                                                   capsys):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, checkpoint)
    before = calibration_path(checkpoint).read_bytes()
    assert main(["evaluate", str(checkpoint), "--dataset", tiny_dataset, "--reports", str(tmp_path / "r"),
                 "--detector", "mahalanobis", "--limit", "20"]) == 0
    assert "accepted as known by detector mahalanobis, threshold" in capsys.readouterr().out
    assert calibration_path(checkpoint).read_bytes() == before  # same share: the stored calibration serves
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["open_set"]["detector"] == "mahalanobis"


@pytest.mark.slow
def test_registered_model_carries_the_calibration(evaluation, trained_checkpoint, photos, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = RegisterConfig(workspace=str(tmp_path / "ws"), model_name="open-set")
    result = register_model(cfg, evaluation, trained_checkpoint)
    served = load_model(result.model_uri, default_tracking_uri(cfg.workspace))
    local = load_model(trained_checkpoint)
    assert served.calibration is not None and served.calibration.metadata() == local.calibration.metadata()
    assert served.metadata["open_set_calibration"] == CALIBRATION_FILE
    for name in (None, "knn"):
        assert predict_files(served, photos, detector=name)[0] == predict_files(local, photos, detector=name)[0]


@pytest.mark.slow
@pytest.mark.parametrize("changed", [CALIBRATION_FILE, TENSORS_FILE])
def test_register_refuses_a_calibration_changed_since_the_report(trained_checkpoint, tiny_dataset, tmp_path, changed):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, checkpoint)
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), dataset=tiny_dataset,
                                                reports=str(tmp_path / "r"), accept_share=0.5, limit=20))
    assert report.open_set.accept_share == 0.5  # a new share recalibrates (and rewrites the files)
    assert read_calibration(checkpoint, report.classes, 16).accept_share == 0.5
    if changed == CALIBRATION_FILE:
        document = json.loads(calibration_path(checkpoint).read_text())
        document["calibration"]["detectors"][DETECTOR_RANKING[0]]["threshold"] += 1.0
        calibration_path(checkpoint).write_text(json.dumps(document))
    else:
        tensors = calibration_path(checkpoint).with_name(TENSORS_FILE)
        tensors.write_bytes(tensors.read_bytes() + b" ")
    with pytest.raises(UserInputError, match=f"{changed} is missing or changed since report .* evaluate this"):
        register_model(RegisterConfig(workspace=str(tmp_path / "ws")), report, checkpoint)

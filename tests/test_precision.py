"""Reduced-precision inference: a calibration per precision, served together, and the same answers as fp32."""

from __future__ import annotations

import json
import shutil

import pytest

from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibration_store import calibration_path
from ray_jobs.inference.loading import load_model
from ray_jobs.inference.precision import OFFERED
from ray_jobs.inference.predict import predict_files


def test_each_precision_is_served_with_the_calibration_made_in_it(trained_checkpoint):
    document = json.loads(calibration_path(trained_checkpoint).read_text())
    assert document["calibration"]["precision"] == "fp32" and set(document["by_precision"]) == set(OFFERED) - {"fp32"}
    thresholds = {}
    for precision in OFFERED:
        model = load_model(trained_checkpoint, precision=precision)
        assert model.precision == precision and model.calibration.precision == precision
        thresholds[precision] = model.calibration.thresholds
    assert thresholds["fp32"] != thresholds["bf16"], "each precision sets its own thresholds from its own features"


def test_a_model_calibrated_in_fp32_only_is_served_in_fp32(trained_checkpoint, tmp_path):
    folder = tmp_path / "older"
    shutil.copytree(trained_checkpoint, folder)
    document = json.loads((folder / "calibration.json").read_text())
    del document["by_precision"]  # as a calibration made before precisions were offered
    (folder / "calibration.json").write_text(json.dumps(document))
    auto = load_model(str(folder))
    assert auto.precision == "fp32" and auto.calibration.precision == "fp32"
    with pytest.raises(UserInputError, match="--precision bf16: .* fp32 only; evaluate it again"):
        load_model(str(folder), precision="bf16")


def test_bf16_gives_the_fp32_top_class_on_at_least_98_percent_of_the_sample(trained_checkpoint, sample_dir):
    photos = sorted(str(path) for path in (sample_dir / "test").rglob("*.jpg"))
    assert len(photos) == 160
    answers = {}
    for precision in ("fp32", "bf16"):
        predictions, failures = predict_files(load_model(trained_checkpoint, precision=precision), photos, top_k=1)
        assert not failures
        answers[precision] = [prediction.top[0][0] for prediction in predictions]
    same = sum(a == b for a, b in zip(answers["fp32"], answers["bf16"], strict=True))
    assert same / len(photos) >= 0.98, f"{same} of {len(photos)} agree"

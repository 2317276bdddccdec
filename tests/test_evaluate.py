"""Evaluation: report consistency, figures, class checks, and never a report.json out of step with its files."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks.evaluation.evaluate as evaluate_module
from flows.cli.main import main
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import load_checkpoint, save_checkpoint
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig, load_report
from tasks.evaluation.summary import summarize


def test_report_metrics_agree_with_the_confusion_matrix(evaluation):
    report = load_report(evaluation.path)  # what is on disk, not the object in memory
    matrix = np.array(report.confusion_matrix)
    n = report.counts["images"]
    assert n == 160 and matrix.shape == (10, 10) and matrix.sum() == n
    assert report.metrics["test_acc1"] == pytest.approx(np.trace(matrix) / n)
    assert report.counts["top1_correct"] == np.trace(matrix)
    assert report.metrics["test_acc1"] <= report.metrics["test_acc5"] <= 1.0
    for i, row in enumerate(report.per_class):
        assert row.name == report.classes[i] and row.support == matrix[i].sum()
        assert row.recall == pytest.approx(matrix[i, i] / matrix[i].sum())
        column = matrix[:, i].sum()
        assert row.precision == pytest.approx(matrix[i, i] / column if column else 0.0)
    assert report.metrics["test_macro_recall"] == pytest.approx(np.mean([r.recall for r in report.per_class]))
    assert report.metrics["test_macro_f1"] == pytest.approx(np.mean([r.f1 for r in report.per_class]))
    for key in ("test_intra", "test_inter", "test_compactness", "test_ce_loss"):
        assert math.isfinite(report.metrics[key]), key
    assert report.metrics["test_compactness"] == pytest.approx(report.metrics["test_intra"] / report.metrics["test_inter"])
    assert len(report.dataset_fingerprint) == 64 and report.train_run == "tiny-eval" and report.image_size == 32


def test_files_exist_match_their_hashes_and_the_csv_matches_the_report(evaluation):
    report = load_report(evaluation.reports_dir)
    assert sorted(p.name for p in Path(report.reports_dir).iterdir()) == sorted([*report.files.values(), "report.json"])
    for role in report.files:
        assert hashlib.sha256(report.file(role).read_bytes()).hexdigest() == report.sha256[role]
    for path in report.images().values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    with report.file("confusion_matrix_csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == report.classes and [r[0] for r in rows[1:]] == report.classes
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == report.confusion_matrix
    assert json.loads(report.path.read_text())["projection"]["method"] == "pca"


def test_summarize_on_known_logits():
    classes = ["a", "b", "c"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 1, 2])
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    features = torch.randn(6, 4)
    metrics, per_class, matrix = summarize(features, logits, labels, classes)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 1]]
    assert metrics["test_acc1"] == pytest.approx(4 / 6)
    assert [r.precision for r in per_class] == pytest.approx([1.0, 0.5, 1.0])
    assert [r.recall for r in per_class] == pytest.approx([0.5, 1.0, 0.5])
    assert per_class[1].f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)


@pytest.mark.parametrize("change", ["renamed", "reordered"])
def test_class_mismatch_names_both_sides(trained_checkpoint, tiny_dataset, tmp_path, change):
    state = load_checkpoint(trained_checkpoint)
    classes = list(state["classes"])
    state["classes"] = ["tiramisu", *classes[1:]] if change == "renamed" else classes[::-1]
    save_checkpoint(tmp_path, state)
    with pytest.raises(UserInputError, match="class mismatch") as err:
        evaluate_checkpoint(EvaluateConfig(checkpoint=str(tmp_path), dataset=tiny_dataset, reports=str(tmp_path / "r")))
    message = str(err.value)
    assert str(tmp_path) in message and str(Path(tiny_dataset).resolve()) in message
    assert ("tiramisu" in message and "apple_pie" in message) if change == "renamed" else "different order" in message
    assert not (tmp_path / "r" / "report.json").exists()


def test_cli_then_failed_rerun_keeps_the_old_report_consistent(
    trained_checkpoint, tiny_dataset, tmp_path, monkeypatch, capsys
):
    reports = tmp_path / "reports"
    code = main(["evaluate", trained_checkpoint, "--dataset", tiny_dataset, "--reports", str(reports), "--limit", "40"])
    assert code == 0 and "report:" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in reports.iterdir()}

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluate_module, "plot_projection", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=trained_checkpoint, dataset=tiny_dataset, reports=str(reports)))
    assert {p.name: p.read_bytes() for p in reports.iterdir()} == before, "old report and files untouched, no staging left"
    assert load_report(reports).counts["images"] == 40


def test_bad_options_and_missing_checkpoint_are_user_errors(tiny_dataset, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none"), "--dataset", tiny_dataset, "--reports", str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--dataset", tiny_dataset, "--reports", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_another_dataset_build_is_refused_unless_asked_and_then_the_report_says_so(
    trained_checkpoint, tiny_dataset, evaluation, tmp_path, capsys
):
    import shutil

    other = tmp_path / "rebuilt"
    shutil.copytree(tiny_dataset, other)  # same classes, but another build (as after a re-ingest)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    reports = tmp_path / "reports"
    assert main(["evaluate", trained_checkpoint, "--dataset", str(other), "--reports", str(reports)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--cross-dataset" in err and "ffffffffffff" in err
    assert not (reports / "report.json").exists()
    assert main(["evaluate", trained_checkpoint, "--dataset", str(other), "--reports", str(reports), "--cross-dataset"]) == 0
    assert "cross-dataset evaluation" in capsys.readouterr().out
    report = load_report(reports)
    assert report.cross_dataset and report.dataset_fingerprint == "f" * 64
    assert report.train_dataset_fingerprint == evaluation.dataset_fingerprint
    assert not evaluation.cross_dataset and evaluation.complete and evaluation.limit is None


def test_a_limited_evaluation_is_marked_incomplete(trained_checkpoint, tiny_dataset, tmp_path):
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=trained_checkpoint, dataset=tiny_dataset,
                                                reports=str(tmp_path), limit=40))
    assert report.limit == 40 and report.split_rows == 160 and not report.complete

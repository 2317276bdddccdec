"""Prediction from a checkpoint: top-k output, per-file errors and exit codes."""

from __future__ import annotations

import pytest

from flows.cli import main
from ray_jobs.errors import UserInputError
from ray_jobs.predict import load_model, predict_files, read_image


@pytest.fixture(scope="module")
def images(sample_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    text = folder / "notes.txt"
    text.write_text("hello")
    good = sorted((sample_dir / "test" / "apple_pie").glob("*.jpg"))[:2]
    return {"good": [str(p) for p in good], "corrupt": str(corrupt), "text": str(text)}


def test_good_and_corrupt_files_exit_1_and_still_print_the_good_one(trained_checkpoint, images, capsys):
    code = main(["predict", images["good"][0], images["corrupt"], "--model", trained_checkpoint, "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == images["good"][0] and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["1.", "2.", "3."]
    assert "corrupt.jpg" in err and "not a readable image" in err and "corrupt.jpg" not in out


def test_all_good_files_exit_0(trained_checkpoint, images, capsys):
    assert main(["predict", *images["good"], "--model", trained_checkpoint, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and all(path in out for path in images["good"])


def test_probabilities_are_sorted_and_top_k_is_clipped_to_the_classes(trained_checkpoint, images):
    model = load_model(trained_checkpoint)
    predictions, failures = predict_files(model, [*images["good"], images["text"]], top_k=50)
    assert [f.path for f in failures] == [images["text"]]
    for prediction in predictions:
        probs = [p for _, p in prediction.top]
        assert len(probs) == 10 and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert {name for name, _ in prediction.top} == set(model.classes)


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserInputError, match="cannot read file"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserInputError, match="empty file"):
        read_image(tmp_path / "empty.jpg")


def test_bad_model_source_and_missing_registry_exit_2(images, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["predict", images["good"][0], "--model", str(tmp_path / "nowhere")]) == 2
    assert "neither an existing checkpoint" in capsys.readouterr().err
    assert main(["predict", images["good"][0], "--workspace", str(tmp_path / "ws")]) == 2
    assert "no model registry at" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()

"""Prediction: top-k output, per-file errors and exit codes; registered-model folders load without unpickling."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from flows.cli.main import main
from ray_jobs.data.decode import read_image
from ray_jobs.errors import UserInputError
from ray_jobs.inference.loading import MODEL_FORMAT, MODEL_WEIGHTS, load_model, model_from_checkpoint
from ray_jobs.inference.predict import predict_files


@pytest.fixture(scope="module")
def images(sample_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    text = folder / "notes.txt"
    text.write_text("hello")
    good = sorted((sample_dir / "test" / "apple_pie").glob("*.jpg"))[:2]
    return {"good": [str(p) for p in good], "corrupt": str(corrupt), "text": str(text)}


def test_good_and_corrupt_files_exit_2_and_still_print_the_good_one(trained_checkpoint, images, capsys):
    code = main(["predict", images["good"][0], images["corrupt"], "--model", trained_checkpoint, "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 2
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


@pytest.fixture(scope="module")
def model_folder(trained_checkpoint, tmp_path_factory):
    """A registered model's folder as `train-food register` logs it: weights.pt (state dict) + MLmodel."""
    from mlflow.models import Model

    loaded = model_from_checkpoint(trained_checkpoint)
    folder = tmp_path_factory.mktemp("model")
    torch.save(loaded.net.state_dict(), folder / MODEL_WEIGHTS)
    metadata = {"format": MODEL_FORMAT, "train_config": loaded.state["config"], "classes": loaded.classes,
                "image_size": loaded.config.data.image_size}
    Model(metadata=metadata).save(folder / "MLmodel")
    return folder


def test_model_folder_loads_the_checkpoint_weights(model_folder, trained_checkpoint):
    served = load_model(str(model_folder))
    reference = model_from_checkpoint(trained_checkpoint)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(served.module(images), reference.net(images)[1])
    assert served.classes == reference.classes and served.image_size == 32


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_as_model_weights_is_refused_and_never_runs(writer, model_folder, images, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    marker = tmp_path / "payload-ran"
    weights = folder / MODEL_WEIGHTS
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        torch.save({"net.fc.weight": _Payload(marker)}, weights)
    with pytest.raises(UserInputError) as refused:
        load_model(str(folder))
    message = str(refused.value)
    assert "\n" not in message and str(weights) in message and "refused" in message
    assert "posix.system" in message  # what it tried to call
    assert main(["predict", images["good"][0], "--model", str(folder)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists(), "loading the model ran code from the weights file"
    try:  # the file really is a payload: loading it the unsafe way runs it
        torch.load(weights, weights_only=False)
    except RuntimeError:  # the bare pickle is no torch file, but its payload ran before torch noticed
        pass
    assert marker.exists()


def test_pickled_model_from_an_older_train_food_is_refused(model_folder, tmp_path):
    from mlflow.models import Model

    folder = tmp_path / "old"
    folder.mkdir()
    Model(flavors={"pytorch": {"pickle_module_name": "mlflow.pytorch.pickle_module"}},
          metadata={"classes": ["a", "b"], "image_size": 32}).save(folder / "MLmodel")
    with pytest.raises(UserInputError, match="pickled model from an older train-food: register the checkpoint again"):
        load_model(str(folder))

"""Load a model for inference: a training checkpoint, a registered model's folder, or an MLflow model URI.

A registered model is a FoodNet state dict (`weights.pt`) plus an `MLmodel` file whose metadata
holds the training config and classes; whatever loads it (the `predict` CLI, a Ray Serve replica,
a batch job on Ray workers) rebuilds the net with `ray_jobs.model` here and needs only torch,
never Prefect. Weights are read with `torch.load(weights_only=True)`, so loading a model never
runs code from the file; a file that needs more than tensors and plain values is refused. MLflow
is imported lazily and only for MLflow sources. Evaluation and registration rebuild a checkpoint
with the same `model_from_checkpoint`.

A model may come with an open-set calibration (`calibration.json` next to the checkpoint or in the
registered model's folder, see `ray_jobs.inference.calibration_store`), one per precision; the
model is loaded to answer in one precision (`ray_jobs.inference.precision`) and carries that
precision's calibration.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ray_jobs.config import TrainConfig, saved_train_config
from ray_jobs.errors import UserInputError
from ray_jobs.inference.calibration_store import AnyCalibration, read_calibrations
from ray_jobs.inference.mlflow_uri import env_default, using_tracking_uri
from ray_jobs.inference.precision import InferencePrecision, resolve_precision
from ray_jobs.model.inputs import input_spec
from ray_jobs.model.checkpoint import UNSAFE_LOAD_ERRORS, load_checkpoint, load_error_line
from ray_jobs.model.foodnet import FoodNet, trained_net

DEFAULT_MODEL_URI = "models:/food-classifier@champion"
MODEL_WEIGHTS = "weights.pt"  # a registered model's state dict, next to its MLmodel file
MODEL_FORMAT = "train-food-state-dict/1"  # MLmodel metadata["format"] of such a model
_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:", "s3://", "gs://", "wasbs://", "dbfs:/", "file:")


class LogitsModel(nn.Module):
    """FoodNet as served: images (float32 NCHW, normalised) -> logits only.

    MLflow's pyfunc flavour expects one tensor out; `FoodNet` returns `(features, logits)`.
    """

    def __init__(self, net: FoodNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[1]


@dataclass
class LoadedModel:
    """A model ready for inference plus what preprocessing and decoding need."""

    module: nn.Module  # images -> logits
    classes: list[str]
    config: TrainConfig  # the training config: image size, arch (so normalisation), loss
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    calibration: AnyCalibration | None = None  # open-set detectors and thresholds; None: never "unknown"
    precision: str = "fp32"  # of the forward (`ray_jobs.inference.precision`), and of `calibration`

    @property
    def image_size(self) -> int:
        return input_spec(self.config).image_size

    @property
    def net(self) -> FoodNet:
        """The FoodNet behind `module`: images -> (features, logits)."""
        return self.module.net


@dataclass(frozen=True)
class CheckpointModel:
    """A FoodNet rebuilt from a training checkpoint, with the checkpoint's config and classes."""

    net: FoodNet
    config: TrainConfig
    classes: list[str]
    state: dict[str, Any]


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> CheckpointModel:
    """Rebuild the trained FoodNet (eval mode) from a checkpoint directory or file."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        config = saved_train_config(state["config"])
        classes = list(state["classes"])
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{path} is not a train-food training checkpoint ({err})") from None
    net = trained_net(config, classes)
    net.load_state_dict(weights)
    return CheckpointModel(net=net.to(device).eval(), config=config, classes=classes, state=state)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(source: str | None = None, tracking_uri: str | None = None,
               precision: InferencePrecision = "auto") -> LoadedModel:
    """Load a checkpoint (directory or file), a registered model's folder or an MLflow model URI
    (default: the champion), to answer in `precision`. Neither runs code from the files it reads.
    """
    source = source or DEFAULT_MODEL_URI
    device = default_device()
    if Path(source, "MLmodel").is_file():  # a downloaded registered model's folder
        folder = Path(source).resolve()
        return in_precision(model_from_folder(folder, str(folder), device), folder, precision)
    if Path(source).exists():
        loaded = model_from_checkpoint(source, device)
        model = LoadedModel(module=LogitsModel(loaded.net).eval(), classes=loaded.classes, config=loaded.config,
                            source=str(source))
        return in_precision(model, source, precision, loaded.state.get("epoch"))
    if not source.startswith(_MLFLOW_SCHEMES):
        raise UserInputError(f"--model {source!r} is neither an existing checkpoint path nor an MLflow model URI")
    return _load_mlflow_model(source, tracking_uri, device, precision)


def in_precision(model: LoadedModel, folder: str | Path, setting: InferencePrecision,
                 epoch: int | None = None) -> LoadedModel:
    """`model` set to answer in `setting` (resolved), with the calibration stored in `folder` for that precision."""
    calibrations = read_calibrations(folder, model.classes, model.config.model.feat_dim, epoch)
    device = next(model.module.parameters()).device
    precision = resolve_precision(setting, device, tuple(calibrations) or None, model.source)
    return replace(model, precision=precision, calibration=calibrations.get(precision))


def _load_mlflow_model(uri: str, tracking_uri: str | None, device: torch.device,
                       precision: InferencePrecision) -> LoadedModel:
    """A model logged by `train-food register`, downloaded from the tracking server."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="train-food-model-") as scratch:  # the weights end up in memory
        try:
            with using_tracking_uri(tracking_uri), env_default("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        except MlflowException as err:
            where = tracking_uri or mlflow.get_tracking_uri()
            raise UserInputError(f"cannot load model {uri} from tracking server {where}: {err.message}") from None
        return in_precision(model_from_folder(Path(local), uri, device), local, precision)


def model_from_folder(folder: Path, source: str, device: torch.device) -> LoadedModel:
    """Rebuild a registered model from its folder: MLmodel metadata + `weights.pt` (tensors only); its
    calibration comes with `in_precision`."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        mlmodel = Model.load(str(folder))
    except (MlflowException, OSError, ValueError) as err:
        raise UserInputError(f"model {source}: unreadable MLmodel file ({err})") from None
    metadata = mlmodel.metadata or {}
    if metadata.get("format") != MODEL_FORMAT:
        older = " (a pickled model from an older train-food: register the checkpoint again)" if "pytorch" in (
            mlmodel.flavors or {}) else ""
        raise UserInputError(f"model {source} was not logged by train-food register as a state dict{older}")
    try:
        config = saved_train_config(metadata["train_config"])
        classes = [str(name) for name in metadata["classes"]]
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"model {source}: incomplete train-food metadata in MLmodel ({err})") from None
    weights = folder / MODEL_WEIGHTS
    shown = weights if Path(source, "MLmodel").is_file() else f"{MODEL_WEIGHTS} of {source}"
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserInputError(f"model {source} has no {MODEL_WEIGHTS}") from None
    except (*UNSAFE_LOAD_ERRORS, OSError) as err:
        raise UserInputError(f"refused to load {shown}: not a plain tensor file ({load_error_line(err)})") from None
    net = trained_net(config, classes)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UserInputError(f"{shown} does not fit the model in its MLmodel metadata ({load_error_line(err)})") from None
    return LoadedModel(
        module=LogitsModel(net).to(device).eval(),
        classes=classes,
        config=config,
        source=source,
        metadata=dict(metadata),
    )

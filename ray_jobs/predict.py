"""Turning a checkpoint or a registered model into class probabilities for image files.

Lives in `ray_jobs` (not `tasks`) on purpose: a registered model is a FoodNet state dict
(`weights.pt`) plus an `MLmodel` file whose metadata holds the training config and classes, and
whatever loads it (this CLI, a Ray Serve replica, a batch job on Ray workers) rebuilds the net
with `ray_jobs.model.build_model` here; it needs only torch/torchvision, never Prefect. Weights are
read with `torch.load(weights_only=True)`, so loading a model never runs code from the file; a
file that needs more than tensors and plain values is refused. MLflow is imported lazily and only
for MLflow sources. Rebuilding a model from a checkpoint lives here too, because evaluation and
registration need exactly the same rebuild.

A model may come with an open-set calibration (`calibration.json` next to the checkpoint or in the
registered model's folder, see `ray_jobs.calibration_store`): then each prediction also names the
nearest class center, its distance and whether the photo is `unknown` (farther than that class's
threshold). Without one, predictions carry no distance and nothing is flagged unknown.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from ray_jobs.calibration_store import read_calibration
from ray_jobs.checkpoint import UNSAFE_LOAD_ERRORS, load_checkpoint, load_error_line
from ray_jobs.config import TrainConfig
from ray_jobs.data import eval_transform
from ray_jobs.decode import decode_rgb
from ray_jobs.errors import UserInputError
from ray_jobs.image_prep import MAX_FILE_BYTES, TooManyPixels, open_image, reencode_reason, upright_rgb
from ray_jobs.model import FoodNet, build_model, head_for_loss, input_normalization
from ray_jobs.open_set import Calibration, open_set_scores

DEFAULT_MODEL_URI = "models:/food-classifier@champion"
MODEL_WEIGHTS = "weights.pt"  # a registered model's state dict, next to its MLmodel file
MODEL_FORMAT = "train-food-state-dict/1"  # MLmodel metadata["format"] of such a model
_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
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
    calibration: Calibration | None = None  # open-set centers and thresholds; None: never "unknown"

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

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


def trained_net(config: TrainConfig, classes: list[str]) -> FoodNet:
    """An empty FoodNet shaped like the trained one, ready for its saved weights.

    The backbone is built without `pretrained`/`weights_path`: the saved state holds every weight,
    and those options would otherwise need the original weight files on this machine.
    """
    model_cfg = config.model.model_copy(update={"pretrained": False, "weights_path": None})
    return build_model(model_cfg, len(classes), head_for_loss(config.loss.kind))


def eval_preprocessing(config: TrainConfig) -> v2.Compose:
    """Resize, center crop and normalise as the trained net expects (its image size and its backbone's stats)."""
    return eval_transform(image_size=config.data.image_size, norm=input_normalization(config.model.arch))


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> CheckpointModel:
    """Rebuild the trained FoodNet (eval mode) from a checkpoint directory or file."""
    state = load_checkpoint(path, map_location="cpu")
    try:
        config = TrainConfig.model_validate(state["config"])
        classes = list(state["classes"])
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"{path} is not a train-food training checkpoint ({err})") from None
    net = trained_net(config, classes)
    net.load_state_dict(weights)
    return CheckpointModel(net=net.to(device).eval(), config=config, classes=classes, state=state)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(source: str | None = None, tracking_uri: str | None = None) -> LoadedModel:
    """Load a checkpoint (directory or file), a registered model's folder or an MLflow model URI
    (default: the champion). Neither runs code from the files it reads.
    """
    source = source or DEFAULT_MODEL_URI
    device = default_device()
    if Path(source, "MLmodel").is_file():  # a downloaded registered model's folder
        folder = Path(source).resolve()
        return model_from_folder(folder, str(folder), device)
    if Path(source).exists():
        loaded = model_from_checkpoint(source, device)
        return LoadedModel(
            module=LogitsModel(loaded.net).eval(),
            classes=loaded.classes,
            config=loaded.config,
            source=str(source),
            calibration=read_calibration(source, loaded.classes, loaded.config.model.feat_dim, loaded.state.get("epoch")),
        )
    if not source.startswith(_MLFLOW_SCHEMES):
        raise UserInputError(f"--model {source!r} is neither an existing checkpoint path nor an MLflow model URI")
    return _load_mlflow_model(source, tracking_uri, device)


@contextmanager
def using_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's global tracking and registry URIs at `uri` (None: leave them), then undo it.

    Needed because parts of MLflow ignore explicit URIs: `log_model` uses the fluent API, and
    downloading `models:/name@alias` resolves the version's `models:/m-...` source globally.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI (and the registry one) into
    os.environ, so "restoring" the previous *resolved* URI would pin MLflow's cwd-relative default
    for the rest of the process. Instead: unset MLflow's globals and put the variables back as found.
    """
    import mlflow

    if uri is None:
        yield
        return
    saved = {key: os.environ.get(key) for key in _URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_mlflow_model(uri: str, tracking_uri: str | None, device: torch.device) -> LoadedModel:
    """A model logged by `train-food register`, downloaded from the tracking server."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="train-food-model-") as scratch:  # the weights end up in memory
        try:
            with using_tracking_uri(tracking_uri), _env_default("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        except MlflowException as err:
            where = tracking_uri or mlflow.get_tracking_uri()
            raise UserInputError(f"cannot load model {uri} from tracking server {where}: {err.message}") from None
        return model_from_folder(Path(local), uri, device)


def model_from_folder(folder: Path, source: str, device: torch.device) -> LoadedModel:
    """Rebuild a registered model from its folder: MLmodel metadata + `weights.pt` (tensors only)."""
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
        config = TrainConfig.model_validate(metadata["train_config"])
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
        calibration=read_calibration(folder, classes, config.model.feat_dim),
    )


@contextmanager
def _env_default(key: str, value: str) -> Iterator[None]:
    """Set an environment variable for one block, unless the user already set it."""
    if key in os.environ:
        yield
        return
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None)


def read_image(path: str | Path) -> Tensor:
    """Decode a file as uint8 RGB CHW, as training saw the ingested copy of such a file.

    `UserInputError` (one line, naming the file) for a file that is too large, holds too many
    pixels or is not a readable image.
    """
    return decode_photo(_read_limited(Path(path)), str(path))


def decode_photo(data: bytes, where: str) -> Tensor:
    """Decode image bytes as uint8 RGB CHW, the way ingestion stores them and training decodes them.

    Bytes ingestion would store as they are go through the training decoder; any others (BMP,
    TIFF, an animation, a rotated phone photo, transparency, 16-bit) are converted the way
    ingestion converts them. Shared by `predict` (files) and the Serve app (request bodies), so a
    photo looks the same to the model in both. `UserInputError` naming `where` for too many pixels
    or bytes that are not a readable image.
    """
    from PIL import UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        image = open_image(data)
        if reencode_reason(image, data) is None:
            return decode_rgb(data, where)
        return pil_to_tensor(upright_rgb(image))
    except TooManyPixels as err:
        raise UserInputError(f"{where}: {err}") from None
    except UnidentifiedImageError:
        raise UserInputError(f"{where}: not a readable image (unknown format or corrupt header)") from None
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means "not a readable image"
        raise UserInputError(f"{where}: not a readable image ({type(err).__name__}: {err})") from None


def _read_limited(path: Path) -> bytes:
    """The file's bytes, refusing before reading one that is larger than `MAX_FILE_BYTES`."""
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise UserInputError(f"{path}: too large to be a photo ({size:,} bytes, limit {MAX_FILE_BYTES:,})")
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise UserInputError(f"{path}: cannot read file: {err.strerror or err}") from None
    if not data:
        raise UserInputError(f"{path}: empty file")
    return data


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first, and the open-set verdict.

    `nearest`, `distance` and `threshold` are None when the model has no calibration; `unknown` is
    then always False.
    """

    path: str
    top: list[tuple[str, float]]
    unknown: bool = False  # farther from the nearest class center than that class's threshold
    nearest: str | None = None  # class whose center is nearest to the image's features
    distance: float | None = None  # distance to that center (the calibration's: relative by default)
    threshold: float | None = None  # that class's calibrated threshold


@dataclass(frozen=True)
class PredictionFailure:
    path: str
    error: str


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise UserInputError(f"--top-k must be at least 1, got {top_k}")


def _verdicts(model: LoadedModel, features: Tensor, count: int) -> list[dict[str, Any]]:
    """Prediction's open-set fields per image (none without a calibration)."""
    if model.calibration is None:
        return [{}] * count
    scores = open_set_scores(features, model.calibration)
    return [
        {"unknown": unknown, "nearest": model.classes[nearest], "distance": distance, "threshold": threshold}
        for nearest, distance, threshold, unknown in zip(scores.nearest.tolist(), scores.distance.tolist(),
                                                         scores.threshold.tolist(), scores.unknown.tolist(), strict=True)
    ]


@torch.no_grad()
def predict_tensors(
    model: LoadedModel, images: Sequence[Tensor], names: Sequence[str] | None = None, top_k: int = 5,
    batch_size: int = 32,
) -> list[Prediction]:
    """Predictions for already-decoded images (uint8 RGB CHW, any size, as `read_image` returns them),
    `batch_size` images per forward pass.

    For callers that decode themselves (a Ray Serve replica reading request bodies); `names` fill
    `Prediction.path` (default: the image's index).
    """
    _check_top_k(top_k)
    names = list(names) if names is not None else [str(index) for index in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    transform = eval_preprocessing(model.config)
    device = next(model.module.parameters()).device
    k = min(top_k, len(model.classes))
    predictions: list[Prediction] = []
    for batch_names, batch_images in zip(_batches(names, batch_size), _batches(images, batch_size), strict=True):
        batch = torch.stack([transform(image) for image in batch_images]).to(device)
        features, logits = model.net(batch)
        values, indices = logits.float().softmax(dim=1).cpu().topk(k, dim=1)
        verdicts = _verdicts(model, features.float().cpu(), len(batch_names))
        for name, vals, idxs, verdict in zip(batch_names, values.tolist(), indices.tolist(), verdicts, strict=True):
            top = [(model.classes[i], v) for i, v in zip(idxs, vals, strict=True)]
            predictions.append(Prediction(name, top, **verdict))
    return predictions


def predict_files(
    model: LoadedModel, paths: Sequence[str], top_k: int = 5, batch_size: int = 32
) -> tuple[list[Prediction], list[PredictionFailure]]:
    """Top-k (class, probability) per readable image; unreadable files are reported, not raised."""
    _check_top_k(top_k)
    predictions: list[Prediction] = []
    failures: list[PredictionFailure] = []
    for chunk in _batches(paths, batch_size):  # decode one batch at a time: full-size photos are large
        names: list[str] = []
        images: list[Tensor] = []
        for path in chunk:
            try:
                images.append(read_image(path))
                names.append(path)
            except UserInputError as err:
                failures.append(PredictionFailure(path, str(err)))
        if images:
            predictions += predict_tensors(model, images, names, top_k, batch_size)
    return predictions, failures


def open_set_verdict(prediction: Prediction) -> str:
    """`unknown (nearest: pizza, distance -3.120 > -4.870)` or `known (nearest: ..., distance -9.410 <= -4.870)`;
    "" uncalibrated. Three decimals, which cosine distances (mostly 0.1 to 0.5) need."""
    if prediction.distance is None:
        return ""
    word, sign = ("unknown", ">") if prediction.unknown else ("known", "<=")
    return f"{word} (nearest: {prediction.nearest}, distance {prediction.distance:.3f} {sign} {prediction.threshold:.3f})"


def format_prediction(prediction: Prediction) -> str:
    """`path` then one indented `rank. class  probability` line per class; the open-set verdict ends the first one."""
    lines = [prediction.path]
    lines += [f"  {rank}. {name:<24} {prob:.4f}" for rank, (name, prob) in enumerate(prediction.top, start=1)]
    verdict = open_set_verdict(prediction)
    if verdict and len(lines) > 1:
        lines[1] += f"   {verdict}"
    return "\n".join(lines)

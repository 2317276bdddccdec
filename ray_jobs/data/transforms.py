"""Transform presets: the random crop-and-flip of training and the resize-and-center-crop of evaluation.

Both end with the backbone's input normalisation (`ray_jobs.model.backbones.input_normalization`
says which). Every random draw comes from torch's generator, which `ParquetImageDataset` seeds per
sample, so an augmentation is replayed exactly on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the inputs a backbone's weights were trained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def train_transform(*, image_size: int, norm: Normalization, min_crop_scale: float) -> v2.Compose:
    """Random resized crop (area share `min_crop_scale`..1 of the image) + flip, then float and `norm`.

    torchvision's default 0.08 lower bound is for long ImageNet schedules; short fine-tuning runs on
    small images learn more from gentler crops, so the strength is a parameter.
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(norm.mean, norm.std),
        ]
    )


def eval_transform(*, image_size: int, norm: Normalization) -> v2.Compose:
    """Resize to 256/224 of the crop, then center crop: the torchvision reference's eval preset."""
    return v2.Compose(
        [
            v2.Resize(round(image_size * 256 / 224), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(norm.mean, norm.std),
        ]
    )


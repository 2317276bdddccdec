"""Transform presets: the augmented random crop of training and the resize-and-center-crop of evaluation.

Both resize with the backbone's interpolation and end with its input normalisation
(`ray_jobs.model.inputs` says which). Every random draw comes from torch's generator, which
`ParquetImageDataset` seeds per sample, so an augmentation is replayed exactly on resume: that is
why the augmentations are torchvision v2's (TrivialAugmentWide, RandAugment, RandomErasing) and
not timm's `create_transform`, which draws from Python's `random`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from ray_jobs.data.image_prep import MAX_ASPECT_RATIO


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the inputs a backbone's weights were trained with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LEGACY_CROP_PCT = 224 / 256  # the torchvision reference's eval crop


def _mode(interpolation: str) -> InterpolationMode:
    return InterpolationMode(interpolation)


def _policy(augment: str, interpolation: InterpolationMode) -> list[v2.Transform]:
    """The automatic augmentation on uint8 images after crop and flip ("crop_flip": none). Its rotations
    and shears on tensors take nearest or bilinear only: bilinear stands in for bicubic there."""
    if interpolation not in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR):
        interpolation = InterpolationMode.BILINEAR
    if augment == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    if augment == "randaugment":
        return [v2.RandAugment(interpolation=interpolation)]
    if augment == "crop_flip":
        return []
    raise ValueError(f"unknown augment {augment!r}")


def train_transform(
    *,
    image_size: int,
    norm: Normalization,
    min_crop_scale: float,
    interpolation: str = "bilinear",
    augment: str = "crop_flip",
    random_erasing: float = 0.0,
) -> v2.Compose:
    """Random resized crop (area share `min_crop_scale`..1) + flip [+ TrivialAugment/RandAugment], then
    float and `norm` [+ random erasing], as in torchvision's classification reference.

    torchvision's default 0.08 lower bound is for long ImageNet schedules; short fine-tuning runs on
    small images learn more from gentler crops, so the strength is a parameter.
    """
    mode = _mode(interpolation)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        *_policy(augment, mode),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(norm.mean, norm.std),
    ]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def eval_transform(
    *, image_size: int, norm: Normalization, interpolation: str = "bilinear", crop_pct: float = LEGACY_CROP_PCT
) -> v2.Compose:
    """Resize the short side to `image_size / crop_pct`, then center crop `image_size`.

    The long side is bounded too (`max_size`), so no input can make the resize allocate more than
    `MAX_ASPECT_RATIO` crops' worth of pixels; decoders refuse anything more elongated first.
    """
    resize = round(image_size / crop_pct)
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=_mode(interpolation), antialias=True,
                      max_size=resize * MAX_ASPECT_RATIO),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(norm.mean, norm.std),
        ]
    )

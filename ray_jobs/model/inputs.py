"""What a backbone expects as input: size, resize interpolation, eval crop fraction, normalisation.

timm backbones say it in their pretrained config (`timm.data.resolve_data_config`): the
EfficientNet-Lites were trained bicubic, at 224 / 240 / 260 px, with crop fractions 0.875 /
0.882 / 0.89 and inputs scaled to [-1, 1]. torchvision's were trained bilinear at 224 px, crop
0.875, ImageNet mean/std. A run's config may override size, interpolation and crop; the driver
writes the resolved values into the config it saves, so a checkpoint records what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from torchvision.transforms import v2

from ray_jobs.config import TrainConfig
from ray_jobs.data.transforms import IMAGENET, Normalization, eval_transform, train_transform
from ray_jobs.model.pretrained import LITE_ARCHS, timm_name

LITE_DROP_PATH = 0.1  # stochastic depth of the timm EfficientNet-Lite blocks; torchvision backbones take none


@dataclass(frozen=True)
class InputSpec:
    """Everything preprocessing needs to feed a backbone as its weights were trained."""

    image_size: int
    interpolation: str
    crop_pct: float
    norm: Normalization

    @property
    def resize(self) -> int:
        """Eval resize of the short side before the center crop (round, not timm's floor: the old
        code's 256/224 rule gives the same pixels, so old checkpoints keep their inputs)."""
        return round(self.image_size / self.crop_pct)


@cache
def backbone_inputs(arch: str) -> InputSpec:
    """The arch's native input, from timm's pretrained config for timm backbones."""
    if arch not in LITE_ARCHS:
        return InputSpec(image_size=224, interpolation="bilinear", crop_pct=0.875, norm=IMAGENET)
    import timm
    from timm.data import resolve_data_config

    resolved = resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(timm_name(LITE_ARCHS[arch])).to_dict())
    return InputSpec(
        image_size=int(resolved["input_size"][-1]),
        interpolation=str(resolved["interpolation"]),
        crop_pct=float(resolved["crop_pct"]),
        norm=Normalization(mean=tuple(resolved["mean"]), std=tuple(resolved["std"])),
    )


def input_spec(cfg: TrainConfig) -> InputSpec:
    """The run's input: its config's size, interpolation and crop where set, the backbone's elsewhere."""
    native = backbone_inputs(cfg.model.arch)
    data = cfg.data
    return InputSpec(
        image_size=data.image_size or native.image_size,
        interpolation=data.interpolation or native.interpolation,
        crop_pct=data.crop_pct or native.crop_pct,
        norm=native.norm,
    )


def eval_preprocessing(cfg: TrainConfig) -> v2.Compose:
    """Resize, center crop and normalise as the trained net expects."""
    spec = input_spec(cfg)
    return eval_transform(image_size=spec.image_size, norm=spec.norm, interpolation=spec.interpolation,
                          crop_pct=spec.crop_pct)


def train_augmentation(cfg: TrainConfig) -> v2.Compose:
    """The run's training transform: its crop strength and augmentations, the backbone's interpolation."""
    spec = input_spec(cfg)
    return train_transform(image_size=spec.image_size, norm=spec.norm, min_crop_scale=cfg.data.min_crop_scale,
                           interpolation=spec.interpolation, augment=cfg.data.augment,
                           random_erasing=cfg.data.random_erasing)


def default_drop_path(arch: str) -> float:
    """0.1 for the Lite backbones, 0 for torchvision's (they take none)."""
    return LITE_DROP_PATH if arch in LITE_ARCHS else 0.0


def drop_path_rate(cfg: TrainConfig) -> float:
    """The run's stochastic depth: its config's, else the arch's default."""
    return default_drop_path(cfg.model.arch) if cfg.model.drop_path_rate is None else cfg.model.drop_path_rate


def with_resolved_inputs(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every backbone-dependent default written out, as the driver saves it."""
    spec = input_spec(cfg)
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"image_size": spec.image_size, "interpolation": spec.interpolation,
                                            "crop_pct": spec.crop_pct}),
        "model": cfg.model.model_copy(update={"drop_path_rate": drop_path_rate(cfg)}),
    })

"""Optimizer and learning-rate schedule: new layers at `lr`, the backbone slower; warm-up then cosine.

Weight decay skips norms, biases and the L-GM means by default (timm's `param_groups_weight_decay`):
decaying a BatchNorm scale or a class mean toward zero regularises nothing useful.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_weight_decay

from ray_jobs.config import OptimConfig, TrainConfig
from ray_jobs.model.foodnet import FoodNet

NO_WEIGHT_DECAY = ("head.means",)  # L-GM class means: 2-D, so timm's 1-D rule alone would decay them


def parameter_groups(model: FoodNet, lr: float, backbone_lr_scale: float, weight_decay: float,
                     decay_norm_and_bias: bool = False) -> list[dict[str, Any]]:
    """The new layers (embedding, head) at `lr` first, then the backbone at `lr * backbone_lr_scale`; each
    split into a no-decay group (norms, biases, L-GM means) and a decay group, unless everything decays
    (the old recipe: then exactly two groups, as old checkpoints' optimizer states have)."""
    if decay_norm_and_bias:
        split = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    else:
        split = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    in_backbone = {id(p) for p in model.backbone.parameters()}
    groups = []
    for backbone, scale in ((False, 1.0), (True, backbone_lr_scale)):
        for group in split:
            params = [p for p in group["params"] if (id(p) in in_backbone) == backbone]
            if params:
                groups.append({"params": params, "lr": lr * scale, "weight_decay": group["weight_decay"]})
    return groups


def build_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    """AdamW (default), SGD with momentum, or Adagrad (the original food study's choice); each group's own
    weight decay (see `parameter_groups`) wins over `cfg.weight_decay`."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimizer_for(cfg: TrainConfig, model: FoodNet) -> torch.optim.Optimizer:
    """The run's optimizer over `model`'s (unwrapped) parameters, grouped by lr and weight decay."""
    groups = parameter_groups(model, cfg.optim.lr, cfg.backbone_lr_scale, cfg.optim.weight_decay,
                              cfg.optim.decay_norm_and_bias)
    return build_optimizer(cfg.optim, groups)


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warmup then cosine decay to zero (warmup never takes the whole run)."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1) * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

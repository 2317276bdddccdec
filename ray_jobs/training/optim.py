"""Optimizer and learning-rate schedule: new layers at `lr`, the backbone slower; warm-up then cosine."""

from __future__ import annotations

import math
from typing import Any

import torch

from ray_jobs.config import OptimConfig
from ray_jobs.model.foodnet import FoodNet


def parameter_groups(model: FoodNet, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """The new layers (embedding, head) at `lr` first, then the backbone at `lr * backbone_lr_scale`."""
    backbone = list(model.backbone.parameters())
    mine = {id(p) for p in backbone}
    new_layers = [p for p in model.parameters() if id(p) not in mine]
    return [{"params": new_layers, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_scale}]


def build_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    """AdamW (default), SGD with momentum, or Adagrad (the original food study's choice)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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

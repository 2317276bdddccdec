"""FoodNet: a backbone, a linear embedding (the features center loss acts on) and a head.

`forward(x) -> (features, logits)`. The embedding is a plain `Linear` (no BatchNorm1d), like the
fc5 feature of Wen et al. and pytorch-center-loss: a BatchNorm1d there would fail on a last batch of
one sample in training mode and would rescale the features the center term measures.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ray_jobs.config import ModelConfig, TrainConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.backbones import build_backbone

Head = Literal["linear", "lgm"]


class LGMHead(nn.Module):
    """L-GM head with identity covariance: logits `-1/2 ||x - mu_k||^2`, learnable means `mu`.

    Computed in fp32 from the exact differences (no `|x|^2 - 2x.mu + |mu|^2` expansion) so autocast
    cannot lose the small distances to cancellation; B*C*D is tiny next to the backbone.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        # Small means so the first logits are nearly uniform instead of dominated by random |mu|^2.
        self.means = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.xavier_uniform_(self.means)

    def forward(self, features: Tensor) -> Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            diff = features.float().unsqueeze(1) - self.means.float().unsqueeze(0)  # B x C x D
            return -0.5 * diff.pow(2).sum(dim=2)


class FoodNet(nn.Module):
    """Backbone (classifier removed) -> Linear embedding `features` -> head `logits`."""

    def __init__(
        self, backbone: nn.Module, backbone_out: int, feat_dim: int, num_classes: int, head: Head
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = nn.Linear(backbone_out, feat_dim)
        self.head: nn.Module
        self.head = nn.Linear(feat_dim, num_classes) if head == "linear" else LGMHead(num_classes, feat_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.embedding(self.backbone(x))
        return features, self.head(features)


def head_for_loss(kind: str) -> Head:
    """Softmax and the center losses use a linear classifier; L-GM needs the Gaussian-mixture head."""
    if kind in ("softmax", "center", "contrastive_center"):
        return "linear"
    if kind == "lgm":
        return "lgm"
    raise UserInputError(f"unknown loss kind {kind!r}; expected softmax, center, lgm or contrastive_center")


def build_model(model_cfg: ModelConfig, num_classes: int, head: Head) -> FoodNet:
    """FoodNet for `model_cfg`; `weights_path` wins over `pretrained` when both are set."""
    if num_classes < 2:
        raise UserInputError(f"num_classes must be at least 2, got {num_classes}")
    backbone, backbone_out = build_backbone(model_cfg)
    return FoodNet(backbone, backbone_out, model_cfg.feat_dim, num_classes, head)


def trained_net(config: TrainConfig, classes: list[str]) -> FoodNet:
    """An empty FoodNet shaped like the trained one, ready for its saved weights.

    The backbone is built without `pretrained`/`weights_path`: the saved state holds every weight,
    and those options would otherwise need the original weight files on this machine.
    """
    model_cfg = config.model.model_copy(update={"pretrained": False, "weights_path": None})
    return build_model(model_cfg, len(classes), head_for_loss(config.loss.kind))

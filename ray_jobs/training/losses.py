"""Training objectives: softmax baseline, softmax + center loss (Wen et al. 2016), L-GM (Wan et al. 2018),
softmax + contrastive-center loss (Qi & Su 2017: compact classes *and* separated centers).

Every objective has the same small interface (`Objective`) so the engine never branches on the
loss kind. All math runs in fp32 whatever autocast does to the model.

Center loss keeps its centers *outside* the DDP-wrapped model on purpose: as a buffer DDP would
overwrite them with rank 0's copy at every forward, as a parameter they would be averaged as a
gradient. Instead every rank all-reduces the per-class sums and counts once per step and applies the
paper's alpha rule to the global batch, so all ranks hold bit-identical centers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ray_jobs.config import LossConfig
from ray_jobs.errors import UserInputError


def distributed() -> bool:
    """True when a process group with more than one rank is up (False in Ray's local mode)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CenterLoss:
    """Class centers updated by the alpha rule, not by an optimizer.

    `loss` is `mean_i 1/2 ||x_i - c_{y_i}||^2` (gradient to the features only); `update_centers`
    applies `c_j -= alpha * sum_{y_i=j}(c_j - x_i) / (1 + n_j)` over the global batch.
    """

    def __init__(
        self, num_classes: int, feat_dim: int, alpha: float, device: torch.device | str | None = None
    ) -> None:
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.alpha = float(alpha)
        # Zeros, like the paper's Caffe layer: centers start at the origin and follow the features.
        self.centers = torch.zeros(num_classes, feat_dim, dtype=torch.float32, device=device)

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Center term in fp32; the centers carry no gradient."""
        x = features.float()
        c = self.centers.to(x.device)[labels.long()]
        return 0.5 * (x - c).pow(2).sum(dim=1).mean()

    @torch.no_grad()
    def update_centers(self, features: Tensor, labels: Tensor) -> None:
        """One alpha step on the global batch: a collective when distributed, every rank must call it."""
        c = self.centers
        num_c, dim = c.shape
        x = features.detach().to(device=c.device, dtype=torch.float32)
        y = labels.detach().to(device=c.device, dtype=torch.long)
        # One fused buffer [sums (C*D) | counts (C)] so the step costs exactly one all-reduce.
        fused = torch.zeros(num_c * dim + num_c, dtype=torch.float32, device=c.device)
        sums = fused[: num_c * dim].view(num_c, dim)
        counts = fused[num_c * dim :]
        sums.index_add_(0, y, x)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float32))
        if distributed():
            dist.all_reduce(fused, op=dist.ReduceOp.SUM)
        n = counts.unsqueeze(1)
        delta = (n * c - sums) / (1.0 + n)  # = sum_{y_i=j}(c_j - x_i) / (1 + n_j); 0 for absent classes
        # A non-finite batch (e.g. an fp16 overflow the GradScaler skips) must not poison the centers
        # forever. The check runs on the all-reduced buffer, so every rank skips together; no host sync.
        delta = torch.where(torch.isfinite(fused).all(), delta, torch.zeros_like(delta))
        c.sub_(self.alpha * delta)

    def state_dict(self) -> dict[str, Any]:
        return {"centers": self.centers.detach().cpu().clone(), "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        centers = state["centers"]
        if tuple(centers.shape) != tuple(self.centers.shape):
            raise UserInputError(
                f"checkpoint centers have shape {tuple(centers.shape)}, expected "
                f"{tuple(self.centers.shape)} (num_classes x feat_dim): checkpoint from another config?"
            )
        self.centers.copy_(centers.to(dtype=torch.float32))
        self.alpha = float(state.get("alpha", self.alpha))

    def to(self, device: torch.device | str) -> CenterLoss:
        self.centers = self.centers.to(device)
        return self


@dataclass
class LossOutput:
    """Scalars for one batch. `aux` is the unweighted second term (center / likelihood; 0 for softmax)."""

    total: Tensor
    ce: Tensor
    aux: Tensor


@runtime_checkable
class Objective(Protocol):
    """What the engine calls; `after_step` once per optimizer step on every rank (it may be a collective)."""

    kind: str

    def __call__(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossOutput: ...

    def after_step(self, features: Tensor, labels: Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def to(self, device: torch.device | str) -> Objective: ...


class _StatelessObjective:
    """Objectives without state beyond the model: nothing to update, save or move."""

    def after_step(self, features: Tensor, labels: Tensor) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def to(self, device: torch.device | str) -> _StatelessObjective:
        return self


class SoftmaxObjective(_StatelessObjective):
    """Plain cross-entropy (with label smoothing): the baseline the others are compared with."""

    kind = "softmax"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def __call__(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossOutput:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return LossOutput(total=ce, ce=ce, aux=torch.zeros((), device=ce.device))


class CenterLossObjective:
    """`CE + lam * L_C`; the centers move in `after_step` even when lam == 0 (so lam=0 is a true ablation)."""

    kind = "center"

    def __init__(
        self, num_classes: int, feat_dim: int, lam: float, alpha: float, device: torch.device | str = "cpu",
        label_smoothing: float = 0.0,
    ) -> None:
        self.lam = float(lam)
        self.label_smoothing = float(label_smoothing)
        self.center_loss = CenterLoss(num_classes, feat_dim, alpha, device=device)

    def center_term(self, features: Tensor, labels: Tensor) -> Tensor:
        return self.center_loss.loss(features, labels)

    def __call__(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossOutput:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        aux = self.center_term(features, labels)
        return LossOutput(total=ce + self.lam * aux, ce=ce, aux=aux)

    def after_step(self, features: Tensor, labels: Tensor) -> None:
        self.center_loss.update_centers(features, labels)

    def state_dict(self) -> dict[str, Any]:
        return self.center_loss.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center_loss.load_state_dict(state)

    def to(self, device: torch.device | str) -> CenterLossObjective:
        self.center_loss.to(device)
        return self


class ContrastiveCenterObjective(CenterLossObjective):
    """`CE + lam * L_ct`: each feature's squared distance to its own center over its summed squared distances
    to the other centers (+ `delta`), halved and averaged (contrastive-center loss, Qi & Su 2017).

    Center loss only tightens each class; dishes of the same ingredients stay close. This term also
    rewards distance from the other classes' centers. Gradient to the features only; the centers
    move by the same all-reduced alpha rule as center loss, so every rank holds identical ones.
    """

    kind = "contrastive_center"

    def __init__(self, num_classes: int, feat_dim: int, lam: float, alpha: float, delta: float,
                 device: torch.device | str = "cpu", label_smoothing: float = 0.0) -> None:
        super().__init__(num_classes, feat_dim, lam, alpha, device, label_smoothing)
        self.delta = float(delta)

    def center_term(self, features: Tensor, labels: Tensor) -> Tensor:
        x = features.float()
        centers = self.center_loss.centers.to(x.device)
        squared = (x.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(dim=2)  # B x C, exact differences
        own = squared.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        others = squared.sum(dim=1) - own
        return 0.5 * (own / (others + self.delta)).mean()


class LGMObjective(_StatelessObjective):
    """L-GM with identity covariance, on the logits `-1/2 ||x - mu_k||^2` of `model.LGMHead`.

    The true-class logit is multiplied by (1 + margin) (a larger distance, so a margin), CE runs on
    that, and `lam * mean 1/2 ||x - mu_y||^2` (the likelihood term, margin-free) is added. The means
    live in the model and learn by gradient, so DDP keeps them in sync; nothing to do after a step.
    """

    kind = "lgm"

    def __init__(self, lam: float, margin: float, label_smoothing: float = 0.0) -> None:
        self.lam = float(lam)
        self.margin = float(margin)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, features: Tensor, logits: Tensor, labels: Tensor) -> LossOutput:
        z = logits.float()
        onehot = F.one_hot(labels.long(), num_classes=z.shape[1]).to(z.dtype)
        ce = F.cross_entropy(z * (1.0 + self.margin * onehot), labels, label_smoothing=self.label_smoothing)
        aux = -z.gather(1, labels.long().unsqueeze(1)).mean()
        return LossOutput(total=ce + self.lam * aux, ce=ce, aux=aux)


def build_objective(
    cfg: LossConfig, num_classes: int, feat_dim: int, device: torch.device | str = "cpu"
) -> Objective:
    """The objective named by `cfg.kind`; pair it with `model.build_model(..., head_for_loss(cfg.kind))`."""
    smoothing = cfg.label_smoothing
    if cfg.kind == "softmax":
        return SoftmaxObjective(smoothing)
    if cfg.kind == "center":
        return CenterLossObjective(num_classes, feat_dim, lam=cfg.lam, alpha=cfg.alpha, device=device,
                                   label_smoothing=smoothing)
    if cfg.kind == "contrastive_center":
        return ContrastiveCenterObjective(num_classes, feat_dim, lam=cfg.lam, alpha=cfg.alpha, delta=cfg.delta,
                                          device=device, label_smoothing=smoothing)
    if cfg.kind == "lgm":
        return LGMObjective(lam=cfg.lam, margin=cfg.margin, label_smoothing=smoothing)
    raise UserInputError(f"unknown loss kind {cfg.kind!r}; expected softmax, center, lgm or contrastive_center")

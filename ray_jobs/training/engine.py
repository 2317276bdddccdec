"""One training epoch and one evaluation pass: plain PyTorch, no Ray, metric dicts out.

Shaped like torchvision's `references/classification/train.py`: functions of (model, objective,
optimizer, loader, device) that run the same in a Ray worker, in local mode and in a unit test.
Collectives are used only when a process group exists, so one process behaves as a world of one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ray_jobs.data.sampler import rank_slice
from ray_jobs.metrics import classification_metrics
from ray_jobs.training.losses import Objective, distributed


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stops instead of writing a poisoned checkpoint."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch = epoch
        self.step = step


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all workers (identity without a process group)."""
    if not distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def cpu_has_bf16() -> bool:
    """The CPU runs bf16 natively (AVX512-BF16 / AMX): there autocast is faster, elsewhere emulated and slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


CPU_BF16_MIN_SIZE = 224  # bench/cpu_speed.py, Lite0 training step: bf16 1.43x fp32 at 224 px, 0.71x at 128 px


@dataclass(frozen=True)
class Precision:
    """The model's forward under bf16 autocast, or fp32. `setting` is the config's: auto, fp32 or bf16.

    auto: bf16 on a GPU, and on a CPU with native bf16 for crops of at least `CPU_BF16_MIN_SIZE`
    (where it measured faster; smaller ones train faster in fp32). The objectives cast features and
    logits to fp32 before any loss arithmetic, so the center terms and updates never run in bf16.
    """

    device: torch.device
    setting: str = "auto"
    image_size: int = CPU_BF16_MIN_SIZE

    @property
    def enabled(self) -> bool:
        if self.setting == "fp32":
            return False
        if self.setting == "bf16" or self.device.type == "cuda":
            return True
        return self.device.type == "cpu" and self.image_size >= CPU_BF16_MIN_SIZE and cpu_has_bf16()

    @property
    def name(self) -> str:
        return "bf16" if self.enabled else "fp32"

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.enabled)


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    epoch: int,
    global_batch: int | None = None,
    precision: Precision | None = None,
    ema: nn.Module | None = None,
) -> dict[str, float]:
    """Train for one pass over `loader`; the scheduler steps per iteration (warmup + cosine), and `ema`
    (timm's `ModelEmaV3` of the unwrapped model, if kept) follows the weights after every step.

    Each of `loader`'s batches is this rank's share of one global batch of `global_batch` samples
    (None: the whole of it). DDP averages the ranks' gradients with equal weights, so each rank's
    loss is weighted by its share: the average is then the gradient of the mean over the global batch,
    whatever the number of workers and however unevenly the batch divides between them.
    """
    model.train()
    world = dist.get_world_size() if distributed() else 1
    precision = precision or Precision(device)
    sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0}
    seen = 0
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        # channels_last on every device: 1.72x the training speed of Lite0 at 224 px on 2 CPUs (bench/cpu_speed.py).
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            features, logits = model(images)
        out = objective(features, logits, labels)
        loss_value = out.total.item()
        if _any_worker(not math.isfinite(loss_value), device):
            raise NonFiniteLossError(epoch, step)
        optimizer.zero_grad(set_to_none=True)
        share = labels.shape[0] * world / global_batch if global_batch else 1.0
        (out.total * share).backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(unwrap(model), step=scheduler.last_epoch)
        objective.after_step(features.detach(), labels)
        batch = labels.shape[0]
        seen += batch
        sums["loss"] += loss_value * batch
        sums["ce"] += out.ce.item() * batch
        sums["aux"] += out.aux.item() * batch
    elapsed = time.perf_counter() - start
    loss, ce, aux, total = _all_reduce_sum([sums["loss"], sums["ce"], sums["aux"], float(seen)], device)
    total = max(total, 1.0)
    return {
        "train_loss": loss / total,
        "train_ce_loss": ce / total,
        "train_center_loss": aux / total,
        "train_images_per_s": total / max(elapsed, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
    }


def _any_worker(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any worker, so all workers stop on the same step."""
    if not distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor)
    return bool(tensor.item() > 0)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    precision: Precision | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, logits and labels of every batch in `loader` (this worker's share), on CPU in fp32
    (the forward in `precision`: by default fp32 on CPU, bf16 on GPU, as before the option existed)."""
    model.eval()
    precision = precision or Precision(device, "fp32" if device.type == "cpu" else "auto")
    features, logits, labels = [], [], []
    for images, batch_labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            batch_features, batch_logits = model(images)
        features.append(batch_features.float().cpu())
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.cpu())
    if not labels:  # an empty share (more workers than rows): nothing to join
        return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def _gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate CPU tensors of any length from all workers in rank order, in one collective
    (identity without a process group). An empty share adds nothing."""
    if not distributed():
        return tensors
    parts: list[tuple[torch.Tensor, ...] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensors)
    joined = []
    for i, mine in enumerate(tensors):
        pieces = [part[i] for part in parts if part is not None and len(part[i])]
        joined.append(torch.cat(pieces) if pieces else mine)
    return tuple(joined)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP: what is saved, and what evaluation runs."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics), as DDP's next forward would: a collective.

    Evaluation then runs the unwrapped module, whose forward is no collective, so a rank with
    nothing to evaluate cannot leave the others waiting (DDP's forward broadcasts buffers first).
    """
    if distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    num_classes: int,
    prefix: str = "val",
    precision: Precision | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy, loss and feature compactness over the whole split, all ranks' shares joined.

    `model` is the plain module (never DDP-wrapped: see `sync_buffers`); `loader` this rank's share,
    which may be empty. One gather, then the metrics of the whole split on every rank.
    """
    features, logits, labels = _gather(*predict(model, loader, device, precision))
    if len(features) == 0:  # nothing anywhere: keep the shapes the metrics expect
        features, logits = features.reshape(0, 1), logits.reshape(0, num_classes)
    return classification_metrics(features, logits, labels, num_classes, prefix)


def share_loader(split: Dataset, rank: int, world: int, batch_size: int, **options: Any) -> DataLoader:
    """This rank's balanced share of `split` (consecutive rows, sizes differ by at most one, never empty
    when rows >= workers), batched."""
    return DataLoader(Subset(split, rank_slice(len(split), rank, world)), batch_size=batch_size, **options)


def validate(model: nn.Module, share: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             num_classes: int) -> dict[str, float]:
    """The worker loop's evaluation of the kept model (the trained one, or its EMA): rank 0's BatchNorm
    statistics everywhere, then this rank's `share` (possibly empty) on the unwrapped module; every rank
    returns the metrics of the whole split. Evaluated in fp32 on CPU, as evaluation and serving do."""
    plain = unwrap(model)
    sync_buffers(plain)
    return evaluate(plain, share, device, num_classes)

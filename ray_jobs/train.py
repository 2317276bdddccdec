"""Distributed training with Ray Train: the worker loop, the trainer, and `fit(cfg)`.

The worker loop reads top to bottom like Ray's TorchTrainer examples: [1] prepare the data
loaders, [2] prepare the model, objective and optimizer (resuming from the latest checkpoint if
Ray hands one back), [3] train, evaluate and report one checkpoint per epoch. `fit` is what the
CLI, the Tune trials and the Prefect flow call; `ScalingConfig.num_workers=0` runs the very same
loop in-process (Ray's local mode) for fast tests.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ray_jobs.checkpoint import load_checkpoint, save_checkpoint
from ray_jobs.config import OptimConfig, TrainConfig
from ray_jobs.data import ParquetImageDataset, dataset_info, eval_transform, train_transform
from ray_jobs.engine import NonFiniteLossError, evaluate, train_one_epoch
from ray_jobs.errors import UserInputError
from ray_jobs.losses import build_objective
from ray_jobs.model import build_model, head_for_loss

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: rank 0 dies once (hard exit) at this epoch and step; `marker` records that it did."""

    epoch: int
    step: int
    marker: str
    # Ray's controller polls workers every 2 s; a crash sooner after a report can lose that report.
    # Waiting first makes the hook test resuming, not that race.
    delay_s: float = 5.0


# ---------------------------------------------------------------- optimizer and schedule


def build_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    """SGD with momentum (default), AdamW, or Adagrad (the original food study's choice)."""
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


# ---------------------------------------------------------------- worker loop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _build_loaders(cfg: TrainConfig, rank: int, world: int) -> tuple[DataLoader, DataLoader]:
    """Train loader sharded by Ray's DistributedSampler; val split into disjoint, unpadded shares."""
    data = cfg.data
    train_set = ParquetImageDataset(data.dataset, "train", train_transform(image_size=data.image_size), data.limit_per_split)
    val_set = ParquetImageDataset(data.dataset, "val", eval_transform(image_size=data.image_size), data.limit_per_split)
    loader_kwargs: dict[str, Any] = {"batch_size": data.batch_size, "num_workers": data.loader_workers}
    if data.loader_workers > 0:
        loader_kwargs |= {"multiprocessing_context": "forkserver", "persistent_workers": True}
    drop_last = len(train_set) >= data.batch_size * max(world, 1) * 2
    train_loader = DataLoader(train_set, shuffle=True, drop_last=drop_last, **loader_kwargs)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), max(world, 1))), **loader_kwargs)
    return ray.train.torch.prepare_data_loader(train_loader), val_loader


def _checkpoint_state(model, objective, optimizer, scheduler, epoch, cfg, classes, metrics) -> dict[str, Any]:
    return {
        "model": _unwrap(model).state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": cfg.model_dump(mode="json"),
        "classes": classes,
        "metrics": metrics,
    }


def _report(metrics: dict[str, float], state: dict[str, Any] | None, local_dir: Path | None) -> None:
    """Report one epoch; rank 0 attaches the checkpoint (a persistent dir in local mode)."""
    if state is None:
        ray.train.report(metrics)
        return
    name = f"checkpoint_epoch_{metrics['epoch']:04d}"
    directory = local_dir / name if local_dir is not None else Path(tempfile.mkdtemp(prefix="train-food-"))
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory, state)
    checkpoint = ray.train.Checkpoint.from_directory(str(directory))
    if local_dir is not None:
        ray.train.report(metrics, checkpoint=checkpoint)
    else:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _progress_line(metrics: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"ce {metrics['train_ce_loss']:.4f}  center {metrics['train_center_loss']:.4f}  "
        f"val_acc1 {metrics['val_acc1']:.3f}  val_acc5 {metrics['val_acc5']:.3f}  "
        f"compactness {metrics['val_compactness']:.3f}  {metrics['train_images_per_s']:.1f} img/s  "
        f"lr {metrics['lr']:.2e}"
    )


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker (or in-process in local mode)."""
    cfg = TrainConfig.model_validate(config["train"])
    classes: list[str] = config["classes"]
    fault: FaultInjection | None = FaultInjection(**config["fault"]) if config.get("fault") else None
    local_dir = Path(config["local_dir"]) if config.get("local_dir") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.run.seed)

    # [1] data
    train_loader, val_loader = _build_loaders(cfg, rank, world)
    device = ray.train.torch.get_device()

    # [2] model, objective, optimizer; resume if Ray hands back a checkpoint
    model = build_model(cfg.model, len(classes), head_for_loss(cfg.loss.kind))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    objective = build_objective(cfg.loss, len(classes), cfg.model.feat_dim, device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.optim, optimizer, len(train_loader))
    start_epoch = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as directory:
            state = load_checkpoint(directory, map_location=device)
        _unwrap(model).load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        if rank == 0:
            print(f"resumed from checkpoint of epoch {start_epoch}", flush=True)

    # [3] train, evaluate, report
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        loader = _with_fault(train_loader, fault, epoch) if fault and rank == 0 else train_loader
        try:
            metrics: dict[str, Any] = train_one_epoch(model, objective, optimizer, scheduler, loader, device, epoch + 1)
        except NonFiniteLossError as err:
            if rank == 0:
                print(f"stopping: {err}; the last good checkpoint is kept", flush=True)
            return {"status": "non_finite", "epoch": err.epoch, "step": err.step, "history": history}
        metrics |= evaluate(model, val_loader, device, len(classes))
        metrics["epoch"] = epoch + 1
        state = _checkpoint_state(model, objective, optimizer, scheduler, epoch + 1, cfg, classes, metrics) if rank == 0 else None
        _report(metrics, state, local_dir)
        history.append(metrics)
        if rank == 0:
            print(_progress_line(metrics, cfg.optim.epochs), flush=True)
    return {"status": "finished", "epoch": cfg.optim.epochs, "history": history}


def _with_fault(loader: DataLoader, fault: FaultInjection, epoch: int):
    """Yield from `loader`, hard-killing this process once at the configured epoch and step."""
    for step, batch in enumerate(loader):
        if epoch + 1 == fault.epoch and step == fault.step and not os.path.exists(fault.marker):
            Path(fault.marker).write_text(f"killed at epoch {fault.epoch} step {fault.step}\n")
            time.sleep(fault.delay_s)
            os._exit(1)
        yield batch


# ---------------------------------------------------------------- driver side


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves behind."""

    name: str
    path: str | None
    metrics: dict[str, Any]
    best_checkpoint: str | None
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


def new_run_name(prefix: str = "train") -> str:
    """A fresh, sortable run name; reusing an old name resumes that run instead."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local cluster with the dashboard on 127.0.0.1.

    `address="local"` is explicit so a stale `/tmp/ray/ray_current_cluster` is never joined.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


def check_resources(cfg: TrainConfig) -> None:
    """Fail within seconds when the request can never fit the cluster (Ray would wait forever)."""
    scaling = cfg.scaling
    if scaling.num_workers == 0:
        return
    total = ray.cluster_resources()
    wants = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        wants["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    for resource, amount in wants.items():
        if amount > total.get(resource, 0.0) + 1e-9:
            raise UserInputError(
                f"{scaling.num_workers} workers need {amount:g} {resource} but the Ray cluster has "
                f"{total.get(resource, 0.0):g}: lower --workers or --cpus-per-worker, or add nodes"
            )


def storage_root(storage_path: str) -> str:
    """Absolute local path (Ray changes the workers' cwd) or the URI unchanged."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def build_trainer(
    cfg: TrainConfig,
    classes: list[str],
    name: str,
    fault: FaultInjection | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for `cfg`: gloo on CPU, nccl on GPU, best-K checkpoints by val_acc1."""
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    storage = storage_root(cfg.run.storage_path)
    local_dir = str(Path(storage) / name) if scaling.num_workers == 0 else None
    loop_config = {
        "train": cfg.model_dump(mode="json"),
        "classes": classes,
        "fault": fault.__dict__ if fault else None,
        "local_dir": local_dir,
    }
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="val_acc1",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=0),
            callbacks=callbacks,
        ),
    )


def fit(cfg: TrainConfig, fault: FaultInjection | None = None) -> TrainResult:
    """Train one model; raise `UserInputError` for bad input and stop on a non-finite loss."""
    info = dataset_info(cfg.data.dataset)
    if cfg.scaling.num_workers > 0:
        ensure_ray(cfg.run.ray_address)
        check_resources(cfg)
        os.environ[START_TIMEOUT_ENV] = str(cfg.scaling.start_timeout_s)
    name = cfg.run.name or new_run_name()
    trainer = build_trainer(cfg, info.classes, name, fault)
    try:
        result = trainer.fit()
    except ray.train.ControllerError as err:
        raise UserInputError(f"training run {name!r} could not start its workers: {err}") from err
    outcome = result.return_value or {}
    if outcome.get("status") == "non_finite":
        raise UserInputError(
            f"training run {name!r} stopped: loss became NaN/inf at epoch {outcome['epoch']}, step "
            f"{outcome['step']}; the last good checkpoint is {_best_path(result) or 'none'}"
        )
    history = outcome.get("history", [])
    return TrainResult(
        name=name,
        path=result.path,
        metrics=dict(history[-1]) if history else dict(result.metrics or {}),
        best_checkpoint=_best_path(result),
        classes=info.classes,
        history=history,
    )


def _best_path(result: ray.train.Result) -> str | None:
    if result.best_checkpoints:
        best, _ = max(result.best_checkpoints, key=lambda pair: pair[1].get("val_acc1", -1.0))
        return best.path
    return result.checkpoint.path if result.checkpoint is not None else None

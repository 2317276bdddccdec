"""Distributed training with Ray Train: the worker loop, the trainer, and `fit(cfg)`.

The worker loop reads top to bottom like Ray's TorchTrainer examples: [1] prepare the data
loaders (our own seeded sampler instead of `prepare_data_loader`'s, so the data order follows
`seed` and survives a restart), [2] prepare the model, objective and optimizer (resuming from the
latest checkpoint of the run, after checking it was made with the same recipe), [3] train,
evaluate and report one checkpoint per epoch. `fit` is what the CLI, the Tune trials and the
Prefect flow call; `ScalingConfig.num_workers=0` runs the very same loop in-process (Ray's local
mode) for fast tests. Every path is resolved on the driver: workers run in other directories.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from ray_jobs.checkpoint import (
    best_checkpoint,
    checkpoint_dir_name,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    stored_checkpoints,
)
from ray_jobs.config import OptimConfig, TrainConfig
from ray_jobs.data import ParquetImageDataset, SeededShardSampler, dataset_info, eval_transform, train_transform
from ray_jobs.engine import NonFiniteLossError, evaluate, train_one_epoch
from ray_jobs.errors import UserInputError
from ray_jobs.losses import build_objective, distributed
from ray_jobs.model import FoodNet, build_model, head_for_loss, input_normalization
from ray_jobs.storage import filesystem, is_uri, join

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_ATTEMPTS = 3


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


# ---------------------------------------------------------------- worker loop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _build_loaders(cfg: TrainConfig, rank: int, world: int) -> tuple[DataLoader, DataLoader]:
    """Train loader over this rank's seeded share (same step count on every rank); val in disjoint shares."""
    data = cfg.data
    norm = input_normalization(cfg.model.arch)
    augment = train_transform(image_size=data.image_size, norm=norm, min_crop_scale=data.min_crop_scale)
    train_set = ParquetImageDataset(data.dataset, "train", augment, data.limit_per_split)
    val_set = ParquetImageDataset(data.dataset, "val", eval_transform(image_size=data.image_size, norm=norm),
                                  data.limit_per_split)
    loader_kwargs: dict[str, Any] = {"batch_size": data.batch_size, "num_workers": data.loader_workers}
    if data.loader_workers > 0:
        loader_kwargs |= {"multiprocessing_context": "forkserver", "persistent_workers": True}
    sampler = SeededShardSampler(train_set.blocks, rank, world, cfg.run.seed)
    drop_last = sampler.num_samples >= data.batch_size * 2
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=drop_last, **loader_kwargs)
    val_loader = DataLoader(Subset(val_set, contiguous_share(len(val_set), rank, world)), **loader_kwargs)
    return train_loader, val_loader


def contiguous_share(rows: int, rank: int, world: int) -> range:
    """This rank's consecutive rows of a split (so it reads only its own row groups); shares may be empty."""
    size = math.ceil(rows / max(world, 1))
    return range(min(rank * size, rows), min((rank + 1) * size, rows))


def _rank_seed(seed: int, rank: int) -> int:
    """Each rank's own stream for stochastic layers (dropout, drop-path): never shared between ranks."""
    return seed * 100_003 + rank + 1


def _restore_rng(states: list[dict[str, Any]], rank: int, world: int) -> None:
    if len(states) != world:  # resumed with another world size: keep the fresh per-rank seeds
        return
    torch.set_rng_state(states[rank]["cpu"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


def _objective_digest(objective: Any) -> str:
    """SHA-256 of the objective's state (the center-loss centers; empty for softmax)."""
    digest = hashlib.sha256()
    for key, value in sorted(objective.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    return digest.hexdigest()


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _rank_states(device: torch.device, objective: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every rank's RNG state, and its Ray node and digest of its centers, in rank order, for rank 0
    to save (one collective for both).

    The per-step all-reduce must leave all ranks with bit-identical centers; if they ever differ the
    run stops here instead of training on diverged copies.
    """
    mine = {
        "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        "worker": {"node": _node_id(), "objective_sha256": _objective_digest(objective)},
    }
    states: list[Any] = [mine]
    if distributed():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
    workers = [state["worker"] for state in states]
    if len({worker["objective_sha256"] for worker in workers}) > 1:
        raise RuntimeError(f"ranks hold different centers: {[worker['objective_sha256'][:12] for worker in workers]}")
    return [state["rng"] for state in states], workers


def _checkpoint_state(model, objective, optimizer, scheduler, epoch, cfg, run, metrics, rng, workers) -> dict[str, Any]:
    return {
        "model": _unwrap(model).state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "workers": workers,
        "epoch": epoch,
        "config": cfg.model_dump(mode="json"),
        "classes": run.classes,
        "dataset_fingerprint": run.dataset_fingerprint,
        "metrics": metrics,
    }


def check_resumable(state: dict[str, Any], cfg: TrainConfig, run: RunInputs, source: str) -> None:
    """Refuse to resume from a checkpoint made by a different recipe instead of silently mixing the two."""
    saved = TrainConfig.model_validate(state["config"])
    differences = []
    for section in ("model", "loss", "optim"):
        old, new = getattr(saved, section).model_dump(), getattr(cfg, section).model_dump()
        differences += [f"{section}.{key} {old[key]!r} -> {new[key]!r}" for key in old if old[key] != new[key]]
    for key in ("image_size", "batch_size", "min_crop_scale", "limit_per_split"):
        old, new = getattr(saved.data, key), getattr(cfg.data, key)
        differences += [f"data.{key} {old!r} -> {new!r}"] if old != new else []
    if saved.run.seed != cfg.run.seed:
        differences.append(f"run.seed {saved.run.seed} -> {cfg.run.seed}")
    if list(state["classes"]) != run.classes:
        differences.append(f"classes {state['classes']} -> {run.classes}")
    if state.get("dataset_fingerprint") != run.dataset_fingerprint:
        differences.append(f"dataset {str(state.get('dataset_fingerprint'))[:12]} -> {run.dataset_fingerprint[:12]}")
    if differences:
        raise UserInputError(
            f"cannot resume run {cfg.run.name!r} from {source}: it was trained with a different config "
            f"({'; '.join(differences)}); start a new run (another --name) instead"
        )


def _report(metrics: dict[str, float], state: dict[str, Any] | None, local_dir: Path | None, keep: int) -> None:
    """Report one epoch; rank 0 attaches the checkpoint.

    In local mode the checkpoint is written straight into the run folder. On a Ray worker it is
    written to a temporary folder that `ray.train.report` copies to storage before it returns (the
    SYNC upload mode), so the folder is removed afterwards: left behind, it cost a full checkpoint
    of /tmp per epoch.
    """
    if state is None:
        ray.train.report(metrics)
        return
    name = checkpoint_dir_name(metrics["epoch"])
    if local_dir is not None:
        save_checkpoint(local_dir / name, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local_dir / name)))
        prune_checkpoints(local_dir, keep)
        return
    with tempfile.TemporaryDirectory(prefix="train-food-checkpoint-") as folder:
        save_checkpoint(folder, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _progress_line(metrics: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"ce {metrics['train_ce_loss']:.4f}  center {metrics['train_center_loss']:.4f}  "
        f"val_acc1 {metrics['val_acc1']:.3f}  val_acc5 {metrics['val_acc5']:.3f}  "
        f"compactness {metrics['val_compactness']:.3f}  {metrics['train_images_per_s']:.1f} img/s  "
        f"lr {metrics['lr']:.2e}"
    )


def _say(line: str, local_dir: Path | None) -> None:
    """Print one progress line once.

    In local mode a plain print (a Prefect flow captures it as a log line). On a Ray Train worker,
    Ray patches `print` to write both to stdout and to its logger, and both reach the driver: write
    to the process's real stdout instead, which Ray forwards once.
    """
    print(line, flush=True, file=None if local_dir is not None else sys.__stdout__)


def _order_digest(sampler: SeededShardSampler) -> int:
    """A 48-bit digest of this epoch's (sample, augmentation seed) order: equal runs see equal digests."""
    digest = hashlib.blake2b(repr(list(sampler)).encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class RunInputs:
    """What the driver resolved for the workers: classes, the dataset build, the test hooks."""

    classes: list[str]
    dataset_fingerprint: str
    local_dir: str | None = None  # local mode: checkpoints go straight here
    fault: dict[str, Any] | None = None


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker (or in-process in local mode).

    Bad input is returned to the driver (status "bad_input") rather than raised: a raised error
    would make Ray restart the workers, and a bad config fails the same way every time.
    """
    cfg = TrainConfig.model_validate(config["train"])
    run = RunInputs(**config["run"])
    try:
        return _train(cfg, run)
    except UserInputError as err:
        return {"status": "bad_input", "error": str(err)}


def _train(cfg: TrainConfig, run: RunInputs) -> dict[str, Any]:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    fault = FaultInjection(**run.fault) if run.fault else None
    local_dir = Path(run.local_dir) if run.local_dir else None
    classes = run.classes

    # [1] data
    train_loader, val_loader = _build_loaders(cfg, rank, world)
    sampler: SeededShardSampler = train_loader.sampler  # type: ignore[assignment]
    device = ray.train.torch.get_device()

    # [2] model (same init on every rank), objective, optimizer; resume if there is a checkpoint
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(classes), head_for_loss(cfg.loss.kind))
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    torch.manual_seed(_rank_seed(cfg.run.seed, rank))
    objective = build_objective(cfg.loss, len(classes), cfg.model.feat_dim, device)
    optimizer = build_optimizer(cfg.optim, parameter_groups(_unwrap(model), cfg.optim.lr, cfg.backbone_lr_scale))
    scheduler = build_scheduler(cfg.optim, optimizer, len(train_loader))
    start_epoch = 0
    resumed = _resume_from(local_dir)
    if resumed is not None:
        with resumed.as_directory() as directory:
            state = load_checkpoint(directory, map_location=device)
            check_resumable(state, cfg, run, directory)
        _unwrap(model).load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], rank, world)
        start_epoch = state["epoch"]
        if rank == 0:
            _say(f"resumed from checkpoint of epoch {start_epoch}", local_dir)

    # [3] train, evaluate, report
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        order = _order_digest(sampler)
        loader = _with_fault(train_loader, fault, epoch) if fault and rank == 0 else train_loader
        try:
            metrics: dict[str, Any] = train_one_epoch(model, objective, optimizer, scheduler, loader, device, epoch + 1)
        except NonFiniteLossError as err:
            if rank == 0:
                _say(f"stopping: {err}; the last good checkpoint is kept", local_dir)
            return {"status": "non_finite", "epoch": err.epoch, "step": err.step, "history": history}
        metrics |= evaluate(model, val_loader, device, len(classes))
        metrics |= {"epoch": epoch + 1, "data_order_digest": order}
        rng, workers = _rank_states(device, objective)
        state = (_checkpoint_state(model, objective, optimizer, scheduler, epoch + 1, cfg, run, metrics, rng, workers)
                 if rank == 0 else None)
        _report(metrics, state, local_dir, cfg.run.keep_checkpoints)
        history.append(metrics)
        if rank == 0:
            _say(_progress_line(metrics, cfg.optim.epochs), local_dir)
    return {"status": "finished", "epoch": cfg.optim.epochs, "history": history}


def _resume_from(local_dir: Path | None) -> ray.train.Checkpoint | None:
    """Ray's latest checkpoint; in local mode (which never hands one back) the latest in the run folder."""
    resumed = ray.train.get_checkpoint()
    if resumed is not None or local_dir is None:
        return resumed
    stored = stored_checkpoints(str(local_dir))
    return ray.train.Checkpoint.from_directory(stored[-1].path) if stored else None


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
    """What a finished run leaves behind. `best_checkpoint` exists and has the run's highest val_acc1."""

    name: str
    path: str
    metrics: dict[str, Any]  # the last epoch's
    best_checkpoint: str | None
    best_metrics: dict[str, Any]
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


def build_trainer(
    cfg: TrainConfig,
    run: RunInputs,
    name: str,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for `cfg` (paths already absolute): gloo on CPU, nccl on GPU, best-K checkpoints."""
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    storage = cfg.run.storage_path
    if scaling.num_workers == 0:
        run = replace(run, local_dir=f"{storage}/{name}")
    # Ray takes a URI's options (an S3 endpoint, ...) as a file system object, not in the path.
    filesystem_, storage = filesystem(storage) if is_uri(storage) else (None, storage)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "run": asdict(run)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement.upper(),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=filesystem_,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="val_acc1",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=0),
            callbacks=callbacks,
        ),
    )


def prepare_driver(cfg: TrainConfig, *, uses_ray: bool) -> tuple[TrainConfig, RunInputs]:
    """On the driver, once: absolute paths, the dataset's classes and fingerprint, and (when the work
    runs on Ray workers) a cluster that can hold the request, with the worker start timeout set."""
    cfg = cfg.with_absolute_paths()
    if cfg.scaling.num_workers == 0 and is_uri(cfg.run.storage_path):
        raise UserInputError(f"--storage-path {cfg.run.storage_path}: in-process runs (--workers 0) keep checkpoints "
                             "on local disk; use a local path, or Ray workers (--workers 1 or more)")
    info = dataset_info(cfg.data.dataset)
    if uses_ray:
        ensure_ray(cfg.run.ray_address)
        check_resources(cfg)
        os.environ[START_TIMEOUT_ENV] = str(cfg.scaling.start_timeout_s)
    return cfg, RunInputs(classes=info.classes, dataset_fingerprint=info.fingerprint)


def fit(cfg: TrainConfig, fault: FaultInjection | None = None) -> TrainResult:
    """Train one model; raise `UserInputError` for bad input and stop on a non-finite loss."""
    cfg, run = prepare_driver(cfg, uses_ray=cfg.scaling.num_workers > 0)
    name = cfg.run.name or new_run_name()
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    run_dir = join(cfg.run.storage_path, name)
    if fault is not None:
        run = replace(run, fault=asdict(fault))
    result = fit_retrying_start(build_trainer(cfg, run, name), name)
    outcome = result.return_value or {}
    best = best_checkpoint(run_dir)
    if outcome.get("status") == "bad_input":
        raise UserInputError(outcome["error"])
    if outcome.get("status") == "non_finite":
        raise UserInputError(
            f"training run {name!r} stopped: loss became NaN/inf at epoch {outcome['epoch']}, step "
            f"{outcome['step']}; the best good checkpoint is {best.path if best else 'none'}"
        )
    history = outcome.get("history", [])
    return TrainResult(
        name=name,
        path=run_dir,
        metrics=dict(history[-1]) if history else dict(best.metrics if best else {}),
        best_checkpoint=best.path if best else None,
        best_metrics=dict(best.metrics) if best else {},
        classes=run.classes,
        history=history,
    )


def fit_retrying_start(trainer: ray.train.torch.TorchTrainer, name: str) -> ray.train.Result:
    """`trainer.fit()`, retried when the worker group fails to start (busy cluster, a node going away).

    `check_resources` already refused requests that can never fit, so a start failure here is
    transient; a retry under the same run name resumes from the latest checkpoint.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return trainer.fit()
        except ray.train.ControllerError as err:
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"training run {name!r}: workers failed to start {attempt} times: {err}") from err
            print(f"training run {name!r}: workers failed to start ({err}); retry {attempt}/{START_ATTEMPTS - 1}",
                  flush=True)
    raise AssertionError("unreachable")

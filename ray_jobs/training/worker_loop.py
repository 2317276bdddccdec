"""The function every Ray Train worker runs (`train_loop_per_worker`), in-process too in local mode.

It reads top to bottom like Ray's TorchTrainer examples: [1] prepare the data
loaders (our own seeded sampler instead of `prepare_data_loader`'s, so the data order follows
`seed` and survives a restart), [2] prepare the model, objective and optimizer (resuming from the
latest checkpoint of the run, after checking it was made with the same recipe), [3] train,
evaluate and report one checkpoint per epoch. The driver side is `ray_jobs.training.trainer`.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from ray_jobs.config import TrainConfig
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.data.sampler import SeededShardSampler
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import load_checkpoint
from ray_jobs.model.foodnet import build_model, head_for_loss
from ray_jobs.model.inputs import eval_preprocessing, input_spec, train_augmentation
from ray_jobs.training.checkpointing import (
    RunInputs,
    check_resumable,
    checkpoint_state,
    latest_checkpoint,
    rank_states,
    report_epoch,
    restore_rng,
    resume_schedule,
)
from ray_jobs.training.engine import NonFiniteLossError, Precision, share_loader, train_one_epoch, unwrap, validate
from ray_jobs.training.losses import build_objective
from ray_jobs.training.optim import build_scheduler, optimizer_for
from ray_jobs.training.progress import Progress, epoch_progress


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: rank 0 dies once (hard exit) at this epoch and step; `marker` records that it did."""

    epoch: int
    step: int
    marker: str
    # Ray's controller polls workers every 2 s; a crash sooner after a report can lose that report.
    # Waiting first makes the hook test resuming, not that race.
    delay_s: float = 5.0


@dataclass(frozen=True)
class Loaders:
    """This rank's train loader (its slice of every global batch) and its share of the val split."""

    train: DataLoader
    val: DataLoader  # this rank's balanced share of the val split


def _build_loaders(cfg: TrainConfig, rank: int, world: int) -> Loaders:
    """Train loader over this rank's slice of each seeded global batch (same step count on every rank)."""
    data = cfg.data
    if data.batch_size < world:
        raise UserInputError(f"--batch-size {data.batch_size} is the global batch: it cannot give each of "
                             f"{world} workers a sample; use at least {world}")
    train_set = ParquetImageDataset(data.dataset, "train", train_augmentation(cfg), data.limit_per_split)
    val_set = ParquetImageDataset(data.dataset, "val", eval_preprocessing(cfg), data.limit_per_split)
    options: dict[str, Any] = {"num_workers": data.loader_workers}
    if data.loader_workers > 0:
        options |= {"multiprocessing_context": "forkserver", "persistent_workers": True}
    sampler = SeededShardSampler(train_set.blocks, rank, world, cfg.run.seed, data.batch_size)
    local_batch = len(sampler.share)
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=local_batch, **options)
    return Loaders(train_loader, share_loader(val_set, rank, world, local_batch, **options))


def _rank_seed(seed: int, rank: int) -> int:
    """Each rank's own stream for stochastic layers (dropout, drop-path): never shared between ranks."""
    return seed * 100_003 + rank + 1


def _announce(sink: Any, progress: Progress) -> None:
    """Rank 0 hands its progress to the driver, which prints or logs it once (no sink: a sweep's
    trial, whose epochs Tune reports to the driver)."""
    if sink is None:
        return
    try:
        sink.put(progress)
    except Exception as err:  # noqa: BLE001 - the relay is for the user; losing it must not end training
        print(f"{progress.line}  (progress relay lost: {type(err).__name__})", flush=True)


def _order_digest(sampler: SeededShardSampler) -> int:
    """A 48-bit digest of this epoch's global batches (samples and augmentation seeds), whatever the
    number of workers: equal runs see equal digests."""
    whole = SeededShardSampler(sampler.blocks, 0, 1, sampler.seed, sampler.global_batch, sampler.window_bytes)
    whole.set_epoch(sampler.epoch)
    digest = hashlib.blake2b(repr(list(whole)).encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker (or in-process in local mode).

    Bad input is returned to the driver (status "bad_input") rather than raised: a raised error
    would make Ray restart the workers, and a bad config fails the same way every time.
    """
    cfg = TrainConfig.model_validate(config["train"])
    run = RunInputs(**config["run"])
    try:
        return _train(cfg, run, config.get("progress"))
    except UserInputError as err:
        return {"status": "bad_input", "error": str(err)}


def _train(cfg: TrainConfig, run: RunInputs, sink: Any) -> dict[str, Any]:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    fault = FaultInjection(**run.fault) if run.fault else None
    local_dir = Path(run.local_dir) if run.local_dir else None
    classes = run.classes

    # [1] data: this rank's slice of every global batch, and the val split
    loaders = _build_loaders(cfg, rank, world)
    sampler: SeededShardSampler = loaders.train.sampler  # type: ignore[assignment]
    device = ray.train.torch.get_device()

    # [2] model (same init on every rank), objective, optimizer; resume if there is a checkpoint
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(classes), head_for_loss(cfg.loss.kind))
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    torch.manual_seed(_rank_seed(cfg.run.seed, rank))
    objective = build_objective(cfg.loss, len(classes), cfg.model.feat_dim, device)
    optimizer = optimizer_for(cfg, unwrap(model))
    ema = ModelEmaV3(unwrap(model), decay=cfg.optim.ema_decay, use_warmup=True) if cfg.optim.ema_decay else None
    kept = ema.module if ema is not None else model  # what is evaluated, saved and served
    # The schedule is a function of progress: epochs x steps per epoch, which the global batch fixes
    # (not the number of workers), so a run resumed on any number of workers continues the same curve.
    scheduler = build_scheduler(cfg.optim, optimizer, sampler.steps)
    start_epoch = 0
    resumed = latest_checkpoint(local_dir)
    if resumed is not None:
        with resumed.as_directory() as directory:
            state = load_checkpoint(directory, map_location=device)
            check_resumable(state, cfg, run, directory)
        unwrap(model).load_state_dict(state["trained_model"] if ema is not None else state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        resume_schedule(scheduler, state["scheduler"], start_epoch * sampler.steps, directory)
        restore_rng(state["rng"], rank, world)
        if rank == 0:
            _announce(sink, Progress(f"resumed from checkpoint of epoch {start_epoch}"))

    # [3] train, evaluate, report
    precision = Precision(device, cfg.scaling.precision, input_spec(cfg).image_size)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        order = _order_digest(sampler)
        loader = _with_fault(loaders.train, fault, epoch) if fault and rank == 0 else loaders.train
        try:
            metrics: dict[str, Any] = train_one_epoch(model, objective, optimizer, scheduler, loader, device, epoch + 1,
                                                      global_batch=cfg.data.batch_size, precision=precision, ema=ema)
        except NonFiniteLossError as err:
            if rank == 0:
                _announce(sink, Progress(f"stopping: {err}; the last good checkpoint is kept"))
            return {"status": "non_finite", "epoch": err.epoch, "step": err.step, "history": history}
        metrics |= validate(kept, loaders.val, device, len(classes))
        metrics |= {"epoch": epoch + 1, "optimizer_steps": scheduler.last_epoch, "data_order_digest": order,
                    "workers": world, "precision": precision.name}
        rng, workers = rank_states(device, objective)
        state = (checkpoint_state(model, objective, optimizer, scheduler, epoch + 1, cfg, run, metrics, rng, workers,
                                  kept=kept) if rank == 0 else None)
        report_epoch(metrics, state, local_dir, cfg.run.keep_checkpoints)
        history.append(metrics)
        if rank == 0:
            per_epoch = (time.perf_counter() - started) / (epoch + 1 - start_epoch)
            _announce(sink, epoch_progress(metrics, cfg.optim.epochs, per_epoch * (cfg.optim.epochs - epoch - 1)))
    return {"status": "finished", "epoch": cfg.optim.epochs, "history": history}


def _with_fault(loader: DataLoader, fault: FaultInjection, epoch: int):
    """Yield from `loader`, hard-killing this process once at the configured epoch and step."""
    for step, batch in enumerate(loader):
        if epoch + 1 == fault.epoch and step == fault.step and not os.path.exists(fault.marker):
            Path(fault.marker).write_text(f"killed at epoch {fault.epoch} step {fault.step}\n")
            time.sleep(fault.delay_s)
            os._exit(1)
        yield batch

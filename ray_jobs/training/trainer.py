"""The driver side of training: resolve the run on the driver, build the TorchTrainer, fit, report the result.

`fit` is what the CLI, the Prefect flow and (through `build_trainer`) the Tune trials call;
`ScalingConfig.num_workers=0` runs the very same worker loop in-process (Ray's local mode) for
fast tests. Every path is resolved here, on the driver: workers run in other directories.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Callable
from typing import Any

import ray
import ray.train
import ray.train.torch

from ray_jobs.cluster import ensure_ray
from ray_jobs.config import TrainConfig
from ray_jobs.dataset_format import dataset_info
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import best_checkpoint, chosen_checkpoint
from ray_jobs.model.inputs import with_resolved_inputs
from ray_jobs.storage import filesystem, is_uri, join
from ray_jobs.training.checkpointing import RunInputs
from ray_jobs.training.progress import Progress, print_progress, progress_relay
from ray_jobs.training.worker_loop import FaultInjection, train_loop_per_worker

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_ATTEMPTS = 3


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves behind. `checkpoint` exists: the last epoch's or the best by val_acc1, as
    `RunConfig.checkpoint_choice` said; `checkpoint_metrics` are its epoch's metrics."""

    name: str
    path: str
    metrics: dict[str, Any]  # the last epoch's
    checkpoint: str | None
    checkpoint_metrics: dict[str, Any]
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


def new_run_name(prefix: str = "train") -> str:
    """A fresh, sortable run name; reusing an old name resumes that run instead."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_resources(cfg: TrainConfig) -> None:
    """Fail within seconds when the request can never fit the cluster (Ray would wait forever)."""
    scaling = cfg.scaling
    if scaling.local:
        return
    total = ray.cluster_resources()
    least = scaling.min_workers  # an elastic group starts with what fits, from MIN up
    wants = {"CPU": least * scaling.cpus_per_worker}
    if scaling.use_gpu:
        wants["GPU"] = least * scaling.gpus_per_worker
    for resource, amount in wants.items():
        if amount > total.get(resource, 0.0) + 1e-9:
            raise UserInputError(
                f"{least} workers need {amount:g} {resource} but the Ray cluster has "
                f"{total.get(resource, 0.0):g}: lower --workers or --cpus-per-worker, or add nodes"
            )


def build_trainer(
    cfg: TrainConfig,
    run: RunInputs,
    name: str,
    callbacks: list[ray.train.UserCallback] | None = None,
    progress: Any = None,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for `cfg` (paths already absolute): gloo on CPU, nccl on GPU, best-K checkpoints.
    Rank 0 puts its epoch lines on `progress` (a queue from `progress_relay`), if given."""
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    storage = cfg.run.storage_path
    if scaling.local:
        run = replace(run, local_dir=f"{storage}/{name}")
    # Ray takes a URI's options (an S3 endpoint, ...) as a file system object, not in the path.
    filesystem_, storage = filesystem(storage) if is_uri(storage) else (None, storage)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "run": asdict(run), "progress": progress},
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
    """On the driver, once: absolute paths, the backbone's input defaults written out (so the checkpoint
    records them), the dataset's classes and fingerprint, and (when the work runs on Ray workers) a
    cluster that can hold the request, with the worker start timeout set."""
    cfg = with_resolved_inputs(cfg.with_absolute_paths())
    if cfg.scaling.local and is_uri(cfg.run.storage_path):
        raise UserInputError(f"--storage-path {cfg.run.storage_path}: in-process runs (--workers 0) keep checkpoints "
                             "on local disk; use a local path, or Ray workers (--workers 1 or more)")
    info = dataset_info(cfg.data.dataset)
    if uses_ray:
        ensure_ray(cfg.run.ray_address)
        check_resources(cfg)
    if cfg.data.batch_size < cfg.scaling.max_workers:
        raise UserInputError(f"--batch-size {cfg.data.batch_size} is the global batch, split over the workers: it "
                             f"needs at least one sample for each of up to {cfg.scaling.max_workers} workers")
    if uses_ray:
        os.environ[START_TIMEOUT_ENV] = str(cfg.scaling.start_timeout_s)
    return cfg, RunInputs(classes=info.classes, dataset_fingerprint=info.fingerprint)


def fit(
    cfg: TrainConfig,
    fault: FaultInjection | None = None,
    on_progress: Callable[[Progress], None] = print_progress,
) -> TrainResult:
    """Train one model; raise `UserInputError` for bad input and stop on a non-finite loss.

    Each epoch's line reaches `on_progress` once, in this process, while the workers train.
    """
    cfg, run = prepare_driver(cfg, uses_ray=not cfg.scaling.local)
    name = cfg.run.name or new_run_name()
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    run_dir = join(cfg.run.storage_path, name)
    if fault is not None:
        run = replace(run, fault=asdict(fault))
    with progress_relay(on_progress, local=cfg.scaling.local) as sink:
        result = fit_retrying_start(build_trainer(cfg, run, name, progress=sink), name)
    outcome = result.return_value or {}
    if outcome.get("status") == "bad_input":
        raise UserInputError(outcome["error"])
    if outcome.get("status") == "non_finite":
        best = best_checkpoint(run_dir)
        raise UserInputError(
            f"training run {name!r} stopped: loss became NaN/inf at epoch {outcome['epoch']}, step "
            f"{outcome['step']}; the best good checkpoint is {best.path if best else 'none'}"
        )
    history = outcome.get("history", [])
    chosen = chosen_checkpoint(run_dir, cfg.run.checkpoint_choice)
    return TrainResult(
        name=name,
        path=run_dir,
        metrics=dict(history[-1]) if history else dict(chosen.metrics if chosen else {}),
        checkpoint=chosen.path if chosen else None,
        checkpoint_metrics=dict(chosen.metrics) if chosen else {},
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

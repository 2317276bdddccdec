"""What one epoch's checkpoint holds, how it is reported to Ray, and how a run resumes from it.

Rank 0 saves the unwrapped model, the objective (the centers), optimizer, schedule, every rank's
RNG state and each rank's node and center digest; every rank restores from the latest checkpoint
of the run after `check_resumable` has refused one made by another recipe.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from ray_jobs.config import TrainConfig, saved_train_config
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import checkpoint_dir_name, prune_checkpoints, save_checkpoint, stored_checkpoints
from ray_jobs.training.engine import unwrap
from ray_jobs.training.losses import distributed

BATCH_SEMANTICS = "global"  # checkpoint["batch"]["semantics"]: --batch-size is split over the workers


@dataclass(frozen=True)
class RunInputs:
    """What the driver resolved for the workers: classes, the dataset build, the test hooks."""

    classes: list[str]
    dataset_fingerprint: str
    local_dir: str | None = None  # local mode: checkpoints go straight here
    fault: dict[str, Any] | None = None


def restore_rng(states: list[dict[str, Any]], rank: int, world: int) -> None:
    """This rank's saved RNG state, when the run resumes with as many ranks as it saved."""
    if len(states) != world:  # resumed with another world size: keep the fresh per-rank seeds
        return
    torch.set_rng_state(states[rank]["cpu"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


def objective_digest(objective: Any) -> str:
    """SHA-256 of the objective's state (the center-loss centers; empty for softmax)."""
    digest = hashlib.sha256()
    for key, value in sorted(objective.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    return digest.hexdigest()


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def rank_states(device: torch.device, objective: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every rank's RNG state, and its Ray node and digest of its centers, in rank order, for rank 0
    to save (one collective for both).

    The per-step all-reduce must leave all ranks with bit-identical centers; if they ever differ the
    run stops here instead of training on diverged copies.
    """
    mine = {
        "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        "worker": {"node": node_id(), "objective_sha256": objective_digest(objective)},
    }
    states: list[Any] = [mine]
    if distributed():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
    workers = [state["worker"] for state in states]
    if len({worker["objective_sha256"] for worker in workers}) > 1:
        raise RuntimeError(f"ranks hold different centers: {[worker['objective_sha256'][:12] for worker in workers]}")
    return [state["rng"] for state in states], workers


def checkpoint_state(model, objective, optimizer, scheduler, epoch, cfg, run, metrics, rng, workers,
                     kept=None) -> dict[str, Any]:
    """`model` holds the kept weights (what evaluation and serving load: the EMA when there is one); with an
    EMA, `trained_model` holds the weights the optimizer moves, which a resume continues from."""
    kept_weights = unwrap(kept if kept is not None else model).state_dict()
    trained = {} if kept is None or kept is model else {"trained_model": unwrap(model).state_dict()}
    return {
        "model": kept_weights,
        **trained,
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "workers": workers,
        "epoch": epoch,
        "config": cfg.model_dump(mode="json"),
        "classes": run.classes,
        "dataset_fingerprint": run.dataset_fingerprint,
        "batch": {"semantics": BATCH_SEMANTICS, "global_batch": cfg.data.batch_size},
        "metrics": metrics,
    }


def check_resumable(state: dict[str, Any], cfg: TrainConfig, run: RunInputs, source: str) -> None:
    """Refuse to resume from a checkpoint made by a different recipe instead of silently mixing the two.

    The number of workers may differ: the global batch, the data order and the schedule do not
    depend on it. A checkpoint from before `--batch-size` meant the global batch is refused.
    """
    if (state.get("batch") or {}).get("semantics") != BATCH_SEMANTICS:
        raise UserInputError(
            f"cannot resume run {cfg.run.name!r} from {source}: it was trained when --batch-size was per worker "
            "(an older train-food), and now it is the global batch; start a new run (another --name) instead"
        )
    saved = saved_train_config(state["config"])
    differences = []
    for section in ("model", "loss", "optim"):
        old, new = getattr(saved, section).model_dump(), getattr(cfg, section).model_dump()
        differences += [f"{section}.{key} {old[key]!r} -> {new[key]!r}" for key in old if old[key] != new[key]]
    for key in ("image_size", "batch_size", "min_crop_scale", "limit_per_split", "augment", "random_erasing",
                "interpolation", "crop_pct"):
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


def report_epoch(metrics: dict[str, float], state: dict[str, Any] | None, local_dir: Path | None, keep: int) -> None:
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


def latest_checkpoint(local_dir: Path | None) -> ray.train.Checkpoint | None:
    """Ray's latest checkpoint; in local mode (which never hands one back) the latest in the run folder."""
    resumed = ray.train.get_checkpoint()
    if resumed is not None or local_dir is None:
        return resumed
    stored = stored_checkpoints(str(local_dir))
    return ray.train.Checkpoint.from_directory(stored[-1].path) if stored else None


def resume_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict[str, Any], done_steps: int,
                    source: str) -> None:
    """Restore the schedule at `done_steps` optimizer steps (epochs done x steps per epoch)."""
    scheduler.load_state_dict(saved)
    if scheduler.last_epoch != done_steps:
        raise UserInputError(f"cannot resume from {source}: its schedule is at step {scheduler.last_epoch}, but "
                             f"the epochs it finished make {done_steps} steps at this global batch")

"""Training end to end: local mode, real Ray workers, fault tolerance and fail-fast input checks."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from ray import cloudpickle  # Ray pickles with its own vendored cloudpickle

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import load_checkpoint
from ray_jobs.training.losses import CenterLoss
from ray_jobs.training.trainer import fit
from ray_jobs.training.worker_loop import FaultInjection


def tiny_config(dataset: str, storage: Path | str, *, workers: int, epochs: int = 2, **overrides) -> TrainConfig:
    """Smallest config that still trains a real ResNet-18 on real photos."""
    return TrainConfig(
        data=DataConfig(dataset=dataset, image_size=32, batch_size=overrides.pop("batch_size", 16), loader_workers=0,
                        limit_per_split=overrides.pop("limit", 64),
                        min_crop_scale=overrides.pop("min_crop_scale", 0.35)),
        model=ModelConfig(arch="resnet18", pretrained=False, feat_dim=32),
        loss=overrides.pop("loss", LossConfig(kind="center", lam=0.01, alpha=0.5)),
        optim=OptimConfig(name="sgd", lr=overrides.pop("lr", 0.05), weight_decay=1e-4, epochs=epochs, warmup_epochs=0),
        scaling=ScalingConfig(num_workers=workers, cpus_per_worker=overrides.pop("cpus_per_worker", 1.0),
                              start_timeout_s=overrides.pop("start_timeout_s", 120)),
        run=RunConfig(storage_path=str(storage), seed=overrides.pop("seed", 0), **overrides),
    )


def assert_hands_on(result, choice: str = "last") -> None:
    """The returned checkpoint exists and is the last epoch's, or holds the highest val_acc1 of the run."""
    scores = [row["val_acc1"] for row in result.history]
    assert result.checkpoint is not None and Path(result.checkpoint, "checkpoint.pt").is_file()
    state = load_checkpoint(result.checkpoint)
    assert state["epoch"] == result.checkpoint_metrics["epoch"]
    if choice == "last":
        assert state["epoch"] == result.history[-1]["epoch"] == len(result.history)
    else:
        assert state["metrics"]["val_acc1"] == max(scores)


def test_local_mode_trains_and_writes_self_describing_checkpoint(tiny_dataset, tmp_path):
    result = fit(tiny_config(tiny_dataset, tmp_path, workers=0, epochs=3, limit=32))
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"], "three epochs on 32 images should lower the loss"
    for key in ("train_ce_loss", "train_center_loss", "val_acc1", "val_acc5", "val_compactness"):
        assert math.isfinite(last[key]), key
    state = load_checkpoint(result.checkpoint)
    assert set(state) >= {"model", "objective", "optimizer", "scheduler", "epoch", "config", "classes"}
    assert state["classes"] == result.classes and len(result.classes) == 10
    centers = state["objective"]["centers"]
    assert centers.shape == (10, 32) and centers.abs().sum() > 0, "centers must move from their zero init"


def test_local_mode_hands_on_the_last_checkpoint_or_the_best_validation_one(tiny_dataset, tmp_path):
    # On 32 images val top-1 wanders, but which seed peaks before the last epoch moves with any numeric
    # change (kernels, memory format): the case under test is the first seed that does.
    def run(seed: int, **choice):
        return fit(tiny_config(tiny_dataset, tmp_path / f"seed-{seed}-{choice}", workers=0, epochs=4, limit=32,
                               keep_checkpoints=1, min_crop_scale=0.08, lr=0.1, seed=seed, **choice))

    for seed in range(6):
        result = run(seed)  # the default: the last epoch
        scores = [row["val_acc1"] for row in result.history]
        if max(scores) > scores[-1]:
            break
    else:
        pytest.fail(f"precondition: no seed in 0-5 gave a run whose best epoch is not the last (last: {scores})")
    assert_hands_on(result, "last")
    kept = sorted(p.name for p in Path(result.path).glob("checkpoint_epoch_*"))
    assert len(kept) == 2, f"keep_checkpoints=1 keeps the best and the latest (to resume from): {kept}"
    best = run(seed, checkpoint_choice="best_val")
    assert [row["val_acc1"] for row in best.history] == scores, "same seed, same run"
    assert_hands_on(best, "best_val")
    assert best.checkpoint_metrics["epoch"] < result.checkpoint_metrics["epoch"] == 4


def test_relative_paths_are_resolved_on_the_driver(tiny_dataset, tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    relative_dataset = os.path.relpath(tiny_dataset, tmp_path)
    result = fit(tiny_config(relative_dataset, "workspace/runs", workers=0, epochs=1, limit=16))
    assert Path(result.checkpoint).is_relative_to(tmp_path / "workspace" / "runs" / result.name)
    assert load_checkpoint(result.checkpoint)["config"]["data"]["dataset"] == str(Path(tiny_dataset).resolve())


def test_resuming_with_another_config_is_refused(tiny_dataset, tmp_path):
    fit(tiny_config(tiny_dataset, tmp_path, workers=0, epochs=1, limit=16, name="first"))
    changed = tiny_config(tiny_dataset, tmp_path, workers=0, epochs=1, limit=16, name="first",
                          loss=LossConfig(kind="center", lam=0.01, alpha=0.3))
    with pytest.raises(UserInputError, match=r"cannot resume run 'first'.*loss.alpha 0.5 -> 0.3"):
        fit(changed)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="no manifest.json"):
        fit(tiny_config(str(tmp_path / "nowhere"), tmp_path, workers=0))


def test_manifest_that_does_not_match_the_shards_is_a_clear_error(tiny_dataset, tmp_path):
    import json
    import shutil

    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    manifest = json.loads((dataset / "manifest.json").read_text())
    first_class = manifest["classes"][0]
    manifest["counts"]["train"][first_class] += 1
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match=r"manifest counts \d+ rows in split 'train' but its shards hold \d+"):
        fit(tiny_config(str(dataset), tmp_path, workers=0))


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import ray_jobs.training.worker_loop as train_module

    real_build = train_module.build_objective
    steps_per_epoch = 2  # limit 32 / batch 16

    def poisoned_build(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        calls = {"n": 0}
        real_call = objective.__call__

        class Poisoned(type(objective)):
            def __call__(self, features, logits, labels):
                out = real_call(features, logits, labels)
                calls["n"] += 1
                if calls["n"] == steps_per_epoch + 2:  # epoch 2, step 1
                    out.total = out.total * float("nan")
                return out

        objective.__class__ = Poisoned
        return objective

    monkeypatch.setattr(train_module, "build_objective", poisoned_build)
    with pytest.raises(UserInputError, match=r"epoch 2, step 1") as err:
        fit(tiny_config(tiny_dataset, tmp_path, workers=0, epochs=3, limit=32, name="nan-run"))
    kept = sorted((tmp_path / "nan-run").glob("checkpoint_epoch_*"))
    assert [p.name for p in kept] == ["checkpoint_epoch_0001"]
    assert "checkpoint_epoch_0001" in str(err.value)
    state = load_checkpoint(kept[0])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_more_workers_than_the_cluster_holds_fails_within_seconds(ray_cluster, tiny_dataset, tmp_path):
    start = time.monotonic()
    with pytest.raises(UserInputError, match="3 workers need 3 CPU but the Ray cluster has 2"):
        fit(tiny_config(tiny_dataset, tmp_path, workers=3))
    assert time.monotonic() - start < 10


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_training_two_epochs(ray_cluster, tiny_dataset, tmp_path, workers):
    scratch_before = set(Path(tempfile.gettempdir()).iterdir())
    result = fit(tiny_config(tiny_dataset, tmp_path, workers=workers, cpus_per_worker=1.0))
    leaked = [path for path in set(Path(tempfile.gettempdir()).iterdir()) - scratch_before
              if (path / "checkpoint.pt").is_file()]
    assert not leaked, f"checkpoint scratch folders left in /tmp: {sorted(leaked)}"  # once filled CI's disk
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.metrics["epoch"] == 2
    state = load_checkpoint(result.checkpoint)
    assert state["epoch"] == 2 and state["config"]["scaling"]["num_workers"] == workers
    assert Path(result.checkpoint).is_relative_to(tmp_path / result.name)
    assert_hands_on(result)
    assert len(state["rng"]) == workers
    if workers == 2:
        assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"]), "ranks must not share a stream"


def _assert_same(a, b, where: str = "") -> None:
    """Recursive exact equality of checkpoint states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_state(ray_cluster, tiny_dataset, tmp_path):
    """2 workers: rank 0 is hard-killed in epoch 2; the resumed run must end where an uninterrupted one does."""
    common = dict(workers=2, epochs=3, limit=32, batch_size=16, keep_checkpoints=3, max_failures=1)  # 8 a worker
    plain = fit(tiny_config(tiny_dataset, tmp_path, name="plain", **common))
    marker = tmp_path / "killed"
    resumed = fit(tiny_config(tiny_dataset, tmp_path, name="resumed", **common),
                  fault=FaultInjection(epoch=2, step=1, marker=str(marker)))
    assert marker.exists(), "the fault was never injected"
    assert [row["epoch"] for row in resumed.history] == [2, 3], "the restarted workers resume after epoch 1"
    orders = {row["epoch"]: row["data_order_digest"] for row in plain.history}
    assert [row["data_order_digest"] for row in resumed.history] == [orders[2], orders[3]], "data order differs"
    a = load_checkpoint(tmp_path / "plain" / "checkpoint_epoch_0003")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_epoch_0003")
    for part in ("objective", "optimizer", "scheduler", "rng", "model"):  # centers, Adam/SGD state, lr, RNG, weights
        _assert_same(a[part], b[part], part)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert not torch.equal(a["rng"][0]["cpu"], a["rng"][1]["cpu"]), "ranks must have their own RNG streams"


def _epoch_curve(history: list[dict]) -> dict[int, tuple[float, int]]:
    """Per epoch: the learning rate and the optimizer steps taken so far."""
    return {int(row["epoch"]): (row["lr"], int(row["optimizer_steps"])) for row in history}


@pytest.mark.slow
def test_a_checkpoint_from_two_workers_resumes_on_one_and_on_three(ray_cluster, tiny_dataset, tmp_path):
    """The global batch fixes the steps per epoch, so the schedule continues the same curve on any count.

    Run "two" trains on 2 workers and dies after its epoch-2 checkpoint; that run resumes on 3 Ray
    workers (same name), and a copy of it on 1 worker in this process. Both must take the optimizer
    steps and learning rates of an uninterrupted run at the same global batch, epoch by epoch, and
    AdamW's step count must be the run's total. BatchNorm statistics depend on each worker's share,
    so the weights are not expected to match bit for bit.
    """
    import shutil

    from ray.train import TrainingFailedError

    common = dict(epochs=4, limit=32, batch_size=8, keep_checkpoints=4, max_failures=0, cpus_per_worker=0.5,
                  loss=LossConfig(kind="center", lam=0.01, alpha=0.5))
    adamw = {"optim": OptimConfig(name="adamw", lr=3e-3, epochs=4, warmup_epochs=1)}

    def config(workers: int, name: str) -> TrainConfig:
        cfg = tiny_config(tiny_dataset, tmp_path, workers=workers, name=name, **common)
        return cfg.model_copy(update=adamw)

    plain = fit(config(0, "plain"))
    with pytest.raises(TrainingFailedError):  # the worker died and no retry is left
        fit(config(2, "two"), fault=FaultInjection(epoch=3, step=0, marker=str(tmp_path / "killed")))
    assert sorted(path.name for path in (tmp_path / "two").glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    for checkpoint in (tmp_path / "two").glob("checkpoint_epoch_*"):  # the files, without Ray's run state
        shutil.copytree(checkpoint, tmp_path / "one" / checkpoint.name)
    on_three = fit(config(3, "two"))
    on_one = fit(config(0, "one"))
    expected = _epoch_curve(plain.history)
    steps = expected[4][1] // 4
    assert steps == 4, "32 rows at a global batch of 8"
    for resumed, workers in ((on_three, 3), (on_one, 1)):
        assert [row["epoch"] for row in resumed.history] == [3, 4]
        assert {row["workers"] for row in resumed.history} == {workers}
        assert _epoch_curve(resumed.history) == {epoch: expected[epoch] for epoch in (3, 4)}
        final = load_checkpoint(Path(resumed.path) / "checkpoint_epoch_0004")
        assert {int(state["step"]) for state in final["optimizer"]["state"].values()} == {4 * steps}
        assert final["scheduler"]["last_epoch"] == 4 * steps
    print("val top-1 after 4 epochs: uninterrupted", plain.history[-1]["val_acc1"],
          "resumed on 3", on_three.history[-1]["val_acc1"], "resumed on 1", on_one.history[-1]["val_acc1"])


@pytest.mark.slow
def test_bad_input_inside_a_ray_worker_is_reported_not_retried(ray_cluster, tiny_dataset, tmp_path):
    fit(tiny_config(tiny_dataset, tmp_path, workers=1, epochs=1, limit=16, name="w"))
    changed = tiny_config(tiny_dataset, tmp_path, workers=1, epochs=1, limit=16, name="w", max_failures=3,
                          loss=LossConfig(kind="center", lam=0.01, alpha=0.3))
    with pytest.raises(UserInputError, match=r"loss.alpha 0.5 -> 0.3"):
        fit(changed)


@pytest.mark.slow
def test_a_worker_group_that_cannot_start_yet_is_retried(ray_cluster, tiny_dataset, tmp_path):
    """A busy cluster is transient: the start is retried, not reported as bad input."""
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group

    hog = placement_group([{"CPU": 2}])
    ray_cluster.get(hog.ready())
    threading.Timer(8, remove_placement_group, args=(hog,)).start()
    result = fit(tiny_config(tiny_dataset, tmp_path, workers=1, epochs=1, limit=16, start_timeout_s=5))
    assert [row["epoch"] for row in result.history] == [1]


def _center_sync_loop(config: dict) -> dict:
    """Runs on 2 Ray workers: each updates centers with its own slice of a known global batch."""
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    centers = CenterLoss(config["classes"], config["dim"], alpha=config["alpha"])
    for step in range(config["steps"]):
        features, labels = _global_batch(step, config)
        bounds = [0, config["split"], len(labels)]  # uneven shares on purpose
        centers.update_centers(features[bounds[rank] : bounds[rank + 1]], labels[bounds[rank] : bounds[rank + 1]])
    gathered = [torch.empty_like(centers.centers) for _ in range(world)]
    dist.all_gather(gathered, centers.centers)
    return {"centers": centers.centers.tolist(), "max_rank_gap": max(float((g - gathered[0]).abs().max()) for g in gathered)}


def _global_batch(step: int, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    features = torch.randn(config["batch"], config["dim"], generator=generator)
    labels = torch.randint(0, config["classes"] - 1, (config["batch"],), generator=generator)  # last class never seen
    return features, labels


@pytest.mark.slow
def test_centers_identical_on_ray_workers_and_equal_to_one_process(ray_cluster, tmp_path):
    import ray.train
    import ray.train.torch

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    config = {"classes": 5, "dim": 8, "alpha": 0.5, "steps": 6, "batch": 12, "split": 5}
    trainer = ray.train.torch.TorchTrainer(
        _center_sync_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="center-sync", storage_path=str(tmp_path)),
    )
    outcome = trainer.fit().return_value
    reference = CenterLoss(config["classes"], config["dim"], alpha=config["alpha"])
    for step in range(config["steps"]):
        reference.update_centers(*_global_batch(step, config))
    assert outcome["max_rank_gap"] == 0.0
    torch.testing.assert_close(torch.tensor(outcome["centers"]), reference.centers, rtol=0, atol=1e-6)
    assert reference.centers[-1].abs().sum() == 0 and reference.centers[0].abs().sum() > 0


@pytest.mark.parametrize(("pretrained", "override", "expected"), [(True, None, 0.3), (False, None, 1.0), (True, 0.5, 0.5)])
def test_backbone_learns_at_a_fraction_of_the_new_layers_lr(pretrained, override, expected):
    from ray_jobs.model.foodnet import build_model
    from ray_jobs.training.optim import build_scheduler, optimizer_for

    cfg = TrainConfig(data=DataConfig(dataset="unused"), model=ModelConfig(pretrained=pretrained, feat_dim=8),
                      optim=OptimConfig(lr=0.002, backbone_lr_scale=override, epochs=2, warmup_epochs=0))
    assert cfg.backbone_lr_scale == expected
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), num_classes=3, head="linear")
    optimizer = optimizer_for(cfg, model)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    backbone = [g for g in optimizer.param_groups if id(g["params"][0]) in backbone_ids]
    new_layers = [g for g in optimizer.param_groups if id(g["params"][0]) not in backbone_ids]
    assert {id(p) for g in backbone for p in g["params"]} == backbone_ids
    assert {id(p) for g in new_layers for p in g["params"]} == {
        id(p) for p in [*model.embedding.parameters(), *model.head.parameters()]}
    assert optimizer.param_groups[0] is new_layers[0], "the reported lr (group 0) is the new layers'"
    assert [g["lr"] for g in new_layers] == pytest.approx([0.002] * len(new_layers))
    assert [g["lr"] for g in backbone] == pytest.approx([0.002 * expected] * len(backbone))
    scheduler = build_scheduler(cfg.optim, optimizer, steps_per_epoch=4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    new_layers, backbone = new_layers[0], backbone[0]
    assert backbone["lr"] / new_layers["lr"] == pytest.approx(expected), "the schedule scales both groups alike"

"""Elastic scale-out on a real multi-node Ray cluster on loopback: spread placement, node loss, 1 worker after.

Two 1-CPU Ray nodes besides a head without CPUs (`ray.cluster_utils.Cluster`, the processes `ray
start` runs). `train-food train --ray-address ... --workers 1-2 --placement spread` is run as a user
runs it; once Ray's controller has registered the second epoch's checkpoint, the node of one worker
is killed. The elastic group restarts from that checkpoint with the 1 worker that still fits and
finishes. (A checkpoint folder in storage is not enough: the controller collects reports every 2 s,
and a worker lost before that loses its reports, so Ray restarts from the last checkpoint it had
registered, from scratch if none; on an idle machine the first epochs take under a second.)

`--batch-size` is the global batch, so the 2-worker epochs and the 1-worker epochs train on the same
global batches with the same schedule as a 1-worker run from start to end: the learning rate and
the optimizer step count of every epoch are equal. The weights and centers are equal up to float
order: each epoch is one step over the whole (limited) train split, and with frozen BatchNorm a
sample's features do not depend on its batch, but a convolution over 4 images rounds differently
from one over 8, and the all-reduce adds in another order. Those differences (3e-7 after the
first step, measured) grow about 2x per step in this tiny, fast-moving net (1e-3 after 16 epochs,
whatever the optimizer: 0.0017 with AdamW on an AMD EPYC, 0.0014 with SGD here), so the centers are
compared where that growth is bounded: after the two epochs the run trained on 2 workers, at
1e-5 (20x the 4.6e-7 measured, 1/10,000 of the centers' size). SGD rather than Adam: Adam divides
each step by the root of its squared-gradient average, so a coordinate whose gradient is near zero
moves by about a full learning rate whichever sign the float order gives it, already at step one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from flows.cli.flags import config_from_args
from flows.cli.main import _build_parser
from ray_jobs.config import TrainConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import checkpoint_dir_name, load_checkpoint, stored_checkpoints
from ray_jobs.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]
TRAIN_FOOD = str(Path(sys.executable).parent / "train-food")
EPOCHS = 16  # enough for the run to outlast the wait for registration and the node's removal
KILL_AFTER_EPOCH = 2


def _recipe(dataset: str, storage: Path, name: str, workers: str) -> list[str]:
    return [
        "--dataset", dataset, "--image-size", "32", "--batch-size", "8", "--limit-per-split", "8",
        "--loader-workers", "0", "--arch", "efficientnet_lite0", "--batch-norm", "frozen", "--feat-dim", "16",
        "--drop-path-rate", "0", "--precision", "fp32",  # drop-path draws per rank; bf16 rounds per batch shape
        "--loss", "center", "--lam", "0.1", "--alpha", "0.5", "--epochs", str(EPOCHS), "--warmup-epochs", "1",
        "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "0", "--keep-checkpoints", str(EPOCHS),
        "--workers", workers, "--storage-path", str(storage), "--name", name, "--seed", "3",
    ]


def registered_epochs(run_dir: Path) -> list[int]:
    """Epochs of the checkpoints Ray's controller has registered (its snapshot in the run folder)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being rewritten
        return []
    return [int(result["metrics"]["epoch"]) for result in snapshot.get("checkpoint_results", [])]


def _load_when_complete(path: str) -> dict:
    """A checkpoint Ray is still copying into storage fails to load: try again for a few seconds."""
    for _ in range(50):
        try:
            return load_checkpoint(path)
        except UserInputError:
            time.sleep(0.1)
    return load_checkpoint(path)


def processes_of(gcs_address: str) -> list[str]:
    """Command lines of the processes still serving the cluster at `gcs_address` (raylets, GCS, workers)."""
    port = gcs_address.rsplit(":", 1)[-1]
    lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for line in lines if f":{port}" in line and "ps -eo" not in line]


@pytest.fixture
def two_node_cluster():
    """A head (no CPUs, dashboard on loopback) and two 1-CPU nodes: one worker fits on each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": free_port()},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def epoch_metrics(run_dir: Path) -> dict[int, dict]:
    """Each stored checkpoint's metrics, by epoch."""
    return {checkpoint.epoch: checkpoint.metrics for checkpoint in stored_checkpoints(str(run_dir))}


@pytest.mark.slow
def test_an_elastic_run_loses_a_node_and_finishes_on_one_worker_like_one_worker(two_node_cluster, tiny_dataset,
                                                                                 tmp_path):
    cluster = two_node_cluster
    storage = tmp_path / "runs"
    run_dir = storage / "spread"
    # The environment the cluster was started with, so the driver's token auth matches the nodes'
    # (adding RAY_AUTH_MODE=token to a cluster without auth stops Train's controller from starting).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [TRAIN_FOOD, "train", *_recipe(tiny_dataset, storage, "spread", workers="1-2"),
               "--placement", "spread", "--ray-address", cluster.address]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while max(registered_epochs(run_dir), default=0) < KILL_AFTER_EPOCH:
                assert driver.poll() is None, f"training ended before the node was removed:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no checkpoint of epoch {KILL_AFTER_EPOCH}:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
            placed = _load_when_complete(stored_checkpoints(str(run_dir))[-1].path)["workers"]
            victim = next(node for node in cluster.worker_nodes if node.node_id == placed[1]["node"])
            cluster.remove_node(victim, allow_graceful=False)
            assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    output = log.read_text()
    assert f"epoch {EPOCHS}/{EPOCHS}" in output
    assert "resumed from checkpoint of epoch" in output, "the run must restart from its checkpoint after the node loss"

    final = load_checkpoint(stored_checkpoints(str(run_dir))[-1].path)
    assert final["epoch"] == EPOCHS
    assert len({worker["node"] for worker in placed}) == 2, "spread placement put both workers on one node"
    assert len(final["workers"]) == 1 and final["workers"][0]["node"] != victim.node_id, "continued on 1 worker"
    elastic = epoch_metrics(run_dir)
    assert elastic[1]["workers"] == 2 and elastic[EPOCHS]["workers"] == 1

    # The same recipe through the CLI's own parser, 1 worker in this process from start to end.
    args = _build_parser().parse_args(["train", *_recipe(tiny_dataset, storage, "one", workers="0")])
    one = fit(config_from_args(args, TrainConfig))
    alone = load_checkpoint(stored_checkpoints(one.path)[-1].path)
    assert alone["epoch"] == EPOCHS
    reference = {int(row["epoch"]): row for row in one.history}
    for epoch, metrics in elastic.items():  # the same schedule, epoch by epoch, whatever the worker count
        assert (metrics["lr"], metrics["optimizer_steps"]) == (reference[epoch]["lr"], reference[epoch]["optimizer_steps"])
    assert sorted(elastic) == list(range(1, EPOCHS + 1))
    on_two = load_checkpoint(run_dir / checkpoint_dir_name(KILL_AFTER_EPOCH))  # trained on 2 workers
    on_one = load_checkpoint(Path(one.path) / checkpoint_dir_name(KILL_AFTER_EPOCH))
    assert len(on_two["workers"]) == 2 and len(on_one["workers"]) == 1
    centers_two, centers_one = on_two["objective"]["centers"], on_one["objective"]["centers"]
    assert centers_one.abs().max() > 0.01, "the centers moved"
    assert torch.allclose(centers_two, centers_one, rtol=0, atol=1e-5), (centers_two - centers_one).abs().max()

    gcs = cluster.address
    cluster.shutdown()
    assert not processes_of(gcs), f"processes of the cluster still running: {processes_of(gcs)}"

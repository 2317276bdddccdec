"""Scale-out on a real multi-node Ray cluster on loopback: spread placement, identical centers, node loss.

Three Ray nodes besides a head without CPUs (`ray.cluster_utils.Cluster`, the processes `ray start`
runs). `train-food train --ray-address ... --workers 2 --placement spread` is run as a user runs it;
once Ray's controller has registered the second epoch's checkpoint, the node of one worker is
killed, and the run must finish from its last registered checkpoint on the nodes that are left.
(A checkpoint folder in storage is not enough: the controller collects reports every 2 s, and a
worker lost before that loses its reports, so Ray restarts from the last checkpoint it had
registered, from scratch if none; on an idle machine the first epochs take under a second.)
At the end both workers' centers are bit-identical (the per-step all-reduce) and equal to a
1-worker run on the same global batches.

"The same global batches": each epoch is one step over the whole (limited) train split, 2 x 4 rows
for the 2-worker run and 8 rows for the 1-worker run. With frozen BatchNorm a sample's features do
not depend on its batch, so the two runs differ only by the float order of the gradient all-reduce.
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
from ray_jobs.model.checkpoint import load_checkpoint, stored_checkpoints
from ray_jobs.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]
TRAIN_FOOD = str(Path(sys.executable).parent / "train-food")
EPOCHS = 16  # enough for the run to outlast the wait for registration and the node's removal
KILL_AFTER_EPOCH = 2


def _recipe(dataset: str, storage: Path, name: str, workers: int, batch_size: int) -> list[str]:
    return [
        "--dataset", dataset, "--image-size", "32", "--batch-size", str(batch_size), "--limit-per-split", "8",
        "--loader-workers", "0", "--arch", "efficientnet_lite0", "--batch-norm", "frozen", "--feat-dim", "16",
        "--loss", "center", "--lam", "0.1", "--alpha", "0.5", "--epochs", str(EPOCHS), "--warmup-epochs", "0",
        "--workers", str(workers), "--storage-path", str(storage), "--name", name, "--seed", "3",
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


@pytest.fixture
def three_node_cluster():
    """A head (no CPUs, dashboard on loopback) and three 2-CPU nodes; every process stopped at the end."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": free_port()},
    )
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_two_workers_on_two_nodes_survive_losing_one_and_match_one_worker(three_node_cluster, tiny_dataset, tmp_path):
    cluster = three_node_cluster
    storage = tmp_path / "runs"
    run_dir = storage / "spread"
    # The environment the cluster was started with, so the driver's token auth matches the nodes'
    # (adding RAY_AUTH_MODE=token to a cluster without auth stops Train's controller from starting).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [TRAIN_FOOD, "train", *_recipe(tiny_dataset, storage, "spread", workers=2, batch_size=4),
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
    nodes_after = {worker["node"] for worker in final["workers"]}
    assert len(nodes_after) == 2 and victim.node_id not in nodes_after
    assert final["workers"][0]["objective_sha256"] == final["workers"][1]["objective_sha256"]

    # The same recipe through the CLI's own parser, with 1 worker in-process and twice the batch.
    args = _build_parser().parse_args(["train", *_recipe(tiny_dataset, storage, "one", workers=0, batch_size=8)])
    one = fit(config_from_args(args, TrainConfig))
    alone = load_checkpoint(stored_checkpoints(one.path)[-1].path)
    assert alone["epoch"] == EPOCHS
    centers_two, centers_one = final["objective"]["centers"], alone["objective"]["centers"]
    assert centers_one.abs().max() > 0.01, "the centers moved"
    assert torch.allclose(centers_two, centers_one, rtol=1e-4, atol=5e-5), (centers_two - centers_one).abs().max()

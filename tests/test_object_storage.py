"""Checkpoints on object storage: a run whose `--storage-path` is an `s3://` URI with an endpoint override.

The S3 endpoint is a local `moto` server (an S3-compatible HTTP server) on 127.0.0.1. Ray workers
write their checkpoints there, a second call resumes from the checkpoint it finds there (the
workers download it, nothing comes from the driver's disk), the best checkpoint is chosen from
the URIs, and evaluation takes the checkpoint's URI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import S3_TEST_CREDENTIALS, free_port

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.errors import UserInputError
from ray_jobs.model.checkpoint import stored_checkpoints
from ray_jobs.storage import filesystem, join
from ray_jobs.training.trainer import fit
from ray_jobs.training.worker_loop import FaultInjection
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig


@pytest.fixture(scope="module")
def s3_storage(tmp_path_factory: pytest.TempPathFactory):
    """An empty bucket on a local S3 server, as a storage URI; the server is stopped afterwards."""
    port = free_port()
    log = (tmp_path_factory.mktemp("s3") / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    saved = {key: os.environ.get(key) for key in S3_TEST_CREDENTIALS}
    os.environ.update(S3_TEST_CREDENTIALS)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="runs")
        yield f"s3://runs/train-food?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _config(dataset: str, storage: str, epochs: int, workers: int = 1) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(dataset=dataset, image_size=32, batch_size=16, loader_workers=0, limit_per_split=32),
        model=ModelConfig(arch="resnet18", pretrained=False, feat_dim=8),
        loss=LossConfig(kind="center"),
        optim=OptimConfig(name="sgd", lr=0.05, epochs=epochs, warmup_epochs=0),
        scaling=ScalingConfig(num_workers=workers, cpus_per_worker=1),
        run=RunConfig(storage_path=storage, name="on-s3", seed=0),
    )


@pytest.mark.slow
def test_checkpoints_live_on_s3_resume_from_there_and_evaluate_by_uri(ray_cluster, s3_storage, tiny_dataset, tmp_path):
    # Rank 0 dies once in epoch 2: Ray restarts the worker group, which resumes from S3's epoch-1 checkpoint.
    marker = tmp_path / "killed"
    result = fit(_config(tiny_dataset, s3_storage, epochs=2), fault=FaultInjection(epoch=2, step=0, marker=str(marker)))
    assert marker.exists()
    assert [epoch["epoch"] for epoch in result.history] == [2], "epoch 1 came from the checkpoint on S3"
    assert result.path == join(s3_storage, "on-s3")
    assert filesystem(result.path)[1] == "runs/train-food/on-s3"
    assert {c.epoch for c in stored_checkpoints(result.path)} == {1, 2}
    assert not (tmp_path / "on-s3").exists() and not list(tmp_path.glob("**/checkpoint_epoch_*")), "nothing local"
    assert result.checkpoint.startswith("s3://runs/train-food/on-s3/checkpoint_epoch_")
    assert result.checkpoint.endswith(s3_storage.split("?", 1)[1])

    report = evaluate_checkpoint(EvaluateConfig(checkpoint=result.checkpoint, dataset=tiny_dataset,
                                                reports=str(tmp_path / "report"), limit=16, loader_workers=0))
    assert report.counts["images"] == 16
    assert report.checkpoint_epoch == result.checkpoint_metrics["epoch"]


def test_in_process_runs_refuse_object_storage(tiny_dataset):
    with pytest.raises(UserInputError, match="in-process runs"):
        fit(_config(tiny_dataset, "s3://runs/x?endpoint_override=127.0.0.1:1&scheme=http", epochs=1, workers=0))

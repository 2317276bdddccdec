"""Shared fixtures: one tiny ingested dataset and one local Ray cluster per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "food-sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed real-photo sample (`train/` and `test/`, 10 classes)."""
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sample ingested once at 64 px (val carved from train), shared read-only by all tests."""
    from tasks.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("datasets") / "food-sample-64"
    ingest(IngestConfig(src=str(SAMPLE), out=str(out), max_side=64, workers=2))
    return str(out)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs; the dashboard stays on (Train's cleanup needs the State API)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tiny model trained once in local mode (32 px, 16-d features, 64 images per split, 2 epochs)."""
    from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
    from ray_jobs.train import fit

    cfg = TrainConfig(
        data=DataConfig(dataset=tiny_dataset, image_size=32, batch_size=16, loader_workers=0, limit_per_split=64),
        model=ModelConfig(arch="resnet18", feat_dim=16),
        loss=LossConfig(kind="center", lam=0.01, alpha=0.5),
        optim=OptimConfig(name="sgd", lr=0.05, epochs=2, warmup_epochs=0),
        scaling=ScalingConfig(num_workers=0),
        run=RunConfig(storage_path=str(tmp_path_factory.mktemp("runs")), name="tiny-eval", seed=0),
    )
    result = fit(cfg)
    assert result.best_checkpoint is not None
    return result.best_checkpoint


@pytest.fixture(scope="session")
def evaluation(trained_checkpoint: str, tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory):
    """`trained_checkpoint` evaluated once on the whole test split (160 images); treat as read-only."""
    from tasks.evaluate import EvaluateConfig, evaluate_checkpoint

    reports = tmp_path_factory.mktemp("reports")
    return evaluate_checkpoint(EvaluateConfig(checkpoint=trained_checkpoint, dataset=tiny_dataset, reports=str(reports)))

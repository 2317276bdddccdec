"""Open-set detectors against each other on food101_mini10, on the same models, post hoc.

For each split (2 of the 10 classes held out, seeded) and training seed, one model trains on the
other 8 with the default recipe at the backbone's native size (local mode), and its best-by-val
checkpoint's features and logits are cached: the eval-mode (unaugmented) train features the
detectors fit on, val (thresholds), known and unknown test photos (read from their files, as a
user's photo is), a few train photos of the held-out classes (choosing KNN's k only), and the head.
The cache is stored under --results, so detectors are scored post hoc and the bench resumes across
sessions; `report` needs only the cache.

Per detector: AUROC (known = positive), FPR at 95% known accepted (the share of unknown photos
accepted at the threshold that accepts 95% of known test photos), AUPR (known positive), and, at
the threshold set on val to accept 95% of known val photos, the shares of known test photos
accepted and unknown test photos flagged; the paired difference of AUROC against MSP over the
models, with a 95% bootstrap interval over models; closed-set top-1.

    python bench/detectors.py train [--splits 5] [--seeds 0 1] [--epochs 5]
    python bench/detectors.py report
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from sklearn.metrics import average_precision_score, roc_curve
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from open_set import features_and_logits, held_out, known_source  # noqa: E402

from ray_jobs.config import DataConfig, LossConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig  # noqa: E402
from ray_jobs.data.parquet import ParquetImageDataset  # noqa: E402
from ray_jobs.inference.detectors import DETECTORS, FitData, make_detector  # noqa: E402
from ray_jobs.inference.loading import CheckpointModel, LoadedModel, LogitsModel, model_from_checkpoint  # noqa: E402
from ray_jobs.metrics import auroc  # noqa: E402
from ray_jobs.model.inputs import eval_preprocessing  # noqa: E402
from ray_jobs.training.engine import Precision, predict  # noqa: E402
from ray_jobs.training.trainer import fit  # noqa: E402
from tasks.ingest.config import IngestConfig  # noqa: E402
from tasks.ingest.pipeline import ingest  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "food101_mini10"
KNN_CHOICES = (1, 5, 10, 20, 50)
UNKNOWN_FOR_K = 15  # train photos per held-out class, used only to choose KNN's k


def _split_features(loaded: CheckpointModel, dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = ParquetImageDataset(dataset, split, eval_preprocessing(loaded.config))
    return predict(loaded.net, DataLoader(data, batch_size=50), torch.device("cpu"), Precision(torch.device("cpu"), "fp32"))


def cache_model(split: int, seed: int, args: argparse.Namespace, out: Path) -> None:
    """Train one model on the known classes of `split` and store what the detectors need."""
    classes = sorted(p.name for p in (SOURCE / "train").iterdir())
    unknown = held_out(classes, split, seed=0, count=2)
    known = [name for name in classes if name not in unknown]
    with tempfile.TemporaryDirectory(prefix="bench-detectors-") as tmp:
        source = known_source(SOURCE, known, Path(tmp) / "src", args.limit_per_class)
        dataset = ingest(IngestConfig(src=str(source), out=f"{tmp}/data", max_side=args.max_side)).out
        cfg = TrainConfig(data=DataConfig(dataset=dataset, batch_size=32, loader_workers=1,
                                          image_size=args.image_size, limit_per_split=None),
                          loss=LossConfig(kind=args.loss), optim=OptimConfig(epochs=args.epochs, warmup_epochs=1),
                          scaling=ScalingConfig(num_workers=0),
                          run=RunConfig(storage_path=f"{tmp}/runs", name=f"split{split}-seed{seed}", seed=seed,
                                        keep_checkpoints=1))
        result = fit(cfg)
        loaded = model_from_checkpoint(result.best_checkpoint)
        served = LoadedModel(module=LogitsModel(loaded.net), classes=loaded.classes, config=loaded.config, source="")
        train, val = (_split_features(loaded, dataset, name) for name in ("train", "val"))
        test_known = [p for name in loaded.classes for p in sorted((SOURCE / "test" / name).iterdir())]
        test_labels = torch.tensor([i for i, name in enumerate(loaded.classes)
                                    for _ in sorted((SOURCE / "test" / name).iterdir())])
        test_unknown = [p for name in unknown for p in sorted((SOURCE / "test" / name).iterdir())]
        tuning_unknown = [p for name in unknown for p in sorted((SOURCE / "train" / name).iterdir())[:UNKNOWN_FOR_K]]
        state = {
            "split": split, "seed": seed, "unknown_classes": unknown, "classes": loaded.classes,
            "config": loaded.state["config"], "best_epoch": loaded.state["epoch"],
            "train": train, "val": val, "test_known": (*features_and_logits(served, test_known), test_labels),
            "test_unknown": features_and_logits(served, test_unknown),
            "tuning_unknown": features_and_logits(served, tuning_unknown),
            "head": (loaded.net.head.weight.detach(), loaded.net.head.bias.detach()),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: _half(value) for key, value in state.items()}, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").rename(out)


def _half(value):
    """Tensors stored in fp16 (a few MB for the whole bench, so it can be committed); the rest as is."""
    if torch.is_tensor(value):
        return value.half() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_half(v) for v in value)
    return value


def threshold_at(scores: torch.Tensor, accept_share: float) -> float:
    """The score above which `accept_share` of `scores` lie (known photos score high)."""
    return float(torch.quantile(scores.double(), 1.0 - accept_share))


def fpr_at_95(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Share of unknown photos accepted by the threshold that accepts 95% of known ones (known = positive)."""
    labels = [1] * len(known) + [0] * len(unknown)
    fpr, tpr, _ = roc_curve(labels, torch.cat([known, unknown]).double().numpy())
    return float(fpr[(tpr >= 0.95).argmax()])


def best_k(state: dict, data: FitData) -> int:
    """KNN's k: the best AUROC of the known val photos against the held-out classes' tuning photos (never test)."""
    val = (state["val"][0].float(), state["val"][1].float())
    tuning = tuple(t.float() for t in state["tuning_unknown"])

    def tuned(k: int) -> float:
        detector = make_detector("knn", k=k).fit(data)
        return auroc(detector.score(*val), detector.score(*tuning))

    return max(KNN_CHOICES, key=tuned)


def score_model(state: dict, name: str) -> dict[str, float]:
    """Fit `name` on the cached train features, threshold it on val, score the test photos."""
    train_f, train_l, train_y = (t.float() for t in state["train"])
    weight, bias = (t.float() for t in state["head"])
    data = FitData(train_f, train_l, train_y.long(), weight, bias)
    options = {"k": best_k(state, data)} if name == "knn" else {}
    detector = make_detector(name, **options).fit(data)
    known_f, known_l, known_y = state["test_known"]
    known = detector.score(known_f.float(), known_l.float())
    unknown = detector.score(*(t.float() for t in state["test_unknown"]))
    threshold = threshold_at(detector.score(state["val"][0].float(), state["val"][1].float()), 0.95)
    labels = [1] * len(known) + [0] * len(unknown)
    return {
        "auroc": auroc(known, unknown), "fpr95": fpr_at_95(known, unknown),
        "aupr": float(average_precision_score(labels, torch.cat([known, unknown]).numpy())),
        "known_accepted": float((known >= threshold).double().mean()),
        "unknown_flagged": float((unknown < threshold).double().mean()),
        "top1": float((known_l.float().argmax(1) == known_y).double().mean()), **options,
    }


def report(results: Path) -> str:
    models = [torch.load(path) for path in sorted(results.glob("split*-seed*.pt"))]
    if not models:
        return f"no cached models under {results}: run `bench/detectors.py train` first"
    scores = {name: [score_model(state, name) for state in models] for name in DETECTORS}
    msp = [row["auroc"] for row in scores["msp"]]
    lines = [f"{len(models)} models (splits x seeds): closed-set top-1 "
             f"{statistics.mean(r['top1'] for r in scores['msp']):.3f}",
             "| detector | AUROC | FPR@95 | AUPR | known accepted (val 95%) | unknown flagged | AUROC - MSP (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    rng = random.Random(0)
    for name, rows in scores.items():
        diffs = [row["auroc"] - base for row, base in zip(rows, msp, strict=True)]
        boots = sorted(statistics.mean(rng.choice(diffs) for _ in diffs) for _ in range(2000))
        cells = [_mean_sd([row[key] for row in rows]) for key in ("auroc", "fpr95", "aupr", "known_accepted",
                                                                    "unknown_flagged")]
        paired = "-" if name == "msp" else f"{statistics.mean(diffs):+.3f} ({boots[50]:+.3f}, {boots[1949]:+.3f})"
        lines.append(f"| {name} | {' | '.join(cells)} | {paired} |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("train", "report"))
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None, help="None: the backbone's native size")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--loss", default="center")
    parser.add_argument("--limit-per-class", type=int, default=None, help="smoke runs: photos per class and split")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "detectors"))
    args = parser.parse_args()
    results = Path(args.results)
    if args.stage == "report":
        print(report(results))
        return
    for split in range(args.splits):
        for seed in args.seeds:
            out = results / f"split{split}-seed{seed}.pt"
            if out.is_file():
                print(f"split {split} seed {seed}: cached", flush=True)
                continue
            cache_model(split, seed, args, out)
            print(f"split {split} seed {seed}: cached {out}", flush=True)


if __name__ == "__main__":
    main()

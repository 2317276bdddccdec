"""Softmax vs center loss vs L-GM on the same data and budget; writes the table of docs/results.md.

Each objective trains from scratch (same seeds, data, model, optimizer and epochs) in local mode,
then its best-by-val checkpoint is evaluated on the test split; the table gives mean ± sd over seeds. Compactness is intra-class spread
over inter-class distance of the features (lower is more compact), from empirical class means.

    python bench/compare_losses.py [--source ../shared/data/food101_mini10] [--epochs 10] [--image-size 48]
                                   [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.train import fit
from tasks.evaluate import EvaluateConfig, evaluate_checkpoint
from tasks.ingest import IngestConfig, ingest

REPO = Path(__file__).resolve().parents[1]
LOSSES = {
    "softmax": LossConfig(kind="softmax"),
    "center": LossConfig(kind="center", lam=0.003, alpha=0.5),
    "lgm": LossConfig(kind="lgm", lam=0.1, margin=0.1),
}


def _mean_sd(values: list[float]) -> str:
    """`mean ± sample sd` (just the value for one run)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "food101_mini10"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per loss and seed")
    parser.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/results.md)")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {name: [] for name in LOSSES}
    with tempfile.TemporaryDirectory(prefix="compare-losses-") as tmp:
        dataset = ingest(IngestConfig(src=args.source, out=f"{tmp}/data", max_side=2 * args.image_size)).out
        for seed in args.seeds:
            for name, loss in LOSSES.items():
                cfg = TrainConfig(
                    data=DataConfig(dataset=dataset, image_size=args.image_size, batch_size=32, loader_workers=1),
                    model=ModelConfig(feat_dim=args.feat_dim),
                    loss=loss,
                    optim=OptimConfig(lr=0.05, epochs=args.epochs, warmup_epochs=1),
                    scaling=ScalingConfig(num_workers=0),
                    run=RunConfig(storage_path=f"{tmp}/runs", name=f"{name}-{seed}", seed=seed),
                )
                start = time.perf_counter()
                result = fit(cfg)
                minutes = (time.perf_counter() - start) / 60
                report = evaluate_checkpoint(EvaluateConfig(checkpoint=result.best_checkpoint, dataset=dataset,
                                                            reports=f"{tmp}/reports/{name}-{seed}"))
                best = result.best_metrics  # the checkpoint evaluated: the highest val top-1 that exists
                assert best["val_acc1"] == max(row["val_acc1"] for row in result.history)
                runs[name].append({"best": best, "test": report.metrics, "minutes": minutes})
                print(f"{name} seed {seed}: best val top-1 {best['val_acc1']:.3f} (epoch {best['epoch']}), "
                      f"test top-1 {report.metrics['test_acc1']:.3f}, {minutes:.1f} min", flush=True)

    lines = [
        "| loss | lambda | best epochs | val top-1 (best) | test top-1 | test top-5 | test compactness | train min/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, loss in LOSSES.items():
        done = runs[name]
        lam = "-" if loss.kind == "softmax" else f"{loss.lam:g}"
        cells = [_mean_sd([run[part][key] for run in done]) for part, key in
                 (("best", "val_acc1"), ("test", "test_acc1"), ("test", "test_acc5"), ("test", "test_compactness"))]
        epochs = ", ".join(str(run["best"]["epoch"]) for run in done)
        minutes = statistics.mean(run["minutes"] for run in done)
        lines.append(f"| {name} | {lam} | {epochs} | {' | '.join(cells)} | {minutes:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()

"""What ASHA saves on a lambda/alpha grid over the pretrained backbone, in one run.

The same grid is swept twice, without early stopping (the full budget) and with ASHA, and one
softmax run gets the same per-trial budget. Reports the epochs trained and the wall time of each
sweep, the ratios ASHA / full, whether ASHA's best setting is the full grid's best, and that best
setting's val top-1 against softmax.

    python bench/tune_efficiency.py [--source ../shared/data/food101_mini10] [--epochs 10] [--image-size 64]
                                    [--lams 0.01 0.1 1] [--alphas 0.1 0.5] [--grace-period 2] [--reduction-factor 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ray_jobs.config import (
    DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, SweepConfig, TrainConfig,
)
from ray_jobs.training.trainer import fit
from ray_jobs.tuning.sweep import run_sweep
from tasks.ingest.config import IngestConfig
from tasks.ingest.pipeline import ingest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "food101_mini10"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--grace-period", type=int, default=SweepConfig.model_fields["grace_period"].default)
    parser.add_argument("--reduction-factor", type=float, default=SweepConfig.model_fields["reduction_factor"].default)
    parser.add_argument("--cpus-per-worker", type=float, default=0.99, help="0.99: two trials (and their 0.01-CPU drivers) fit on 2 CPUs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        workdir = Path(tmp)
        dataset = ingest(IngestConfig(src=args.source, out=str(workdir / "data"), max_side=2 * args.image_size)).out
        train = TrainConfig(
            data=DataConfig(dataset=dataset, image_size=args.image_size, batch_size=32, loader_workers=0),
            model=ModelConfig(arch="efficientnet_lite0"),  # the backbone of its figures
            loss=LossConfig(kind="center"),
            optim=OptimConfig(epochs=args.epochs, warmup_epochs=1),
            scaling=ScalingConfig(num_workers=1, cpus_per_worker=args.cpus_per_worker),
            run=RunConfig(storage_path=str(workdir / "runs"), seed=0, checkpoint_choice="best_val"),
        )
        rows = {}
        for scheduler in ("none", "asha"):
            cfg = SweepConfig(train=train, name=f"bench-{scheduler}", grid_lams=tuple(args.lams),
                              grid_alphas=tuple(args.alphas), scheduler=scheduler, grace_period=args.grace_period,
                              reduction_factor=args.reduction_factor, report_dir=str(workdir / "sweeps"))
            start = time.perf_counter()
            result = run_sweep(cfg)
            rows[scheduler] = {
                "epochs": int(result.table["epochs"].sum()),
                "stopped": int((result.table["status"] == "stopped early").sum()),
                "wall_s": time.perf_counter() - start,
                "best": (result.best_config["lam"], result.best_config["alpha"]),
                "best_val_acc1": result.best_val_acc1,
            }
            print(result.table[["lam", "alpha", "status", "epochs", "best_val_acc1"]].to_string(index=False), flush=True)
        softmax = fit(train.model_copy(update={"loss": LossConfig(kind="softmax"),
                                               "run": train.run.model_copy(update={"name": "softmax"})}))

    trials = len(args.lams) * len(args.alphas)
    print(f"\n{trials} grid trials x {args.epochs} epochs, pretrained efficientnet_lite0, {args.image_size} px, "
          f"1 worker per trial, ASHA grace {args.grace_period} / reduction {args.reduction_factor:g}")
    print(f"{'scheduler':<10} {'epochs':>7} {'stopped':>8} {'wall s':>8} {'best (lam, alpha)':>20} {'val top-1':>10}")
    for scheduler, row in rows.items():
        best = f"({row['best'][0]:g}, {row['best'][1]:g})"
        print(f"{scheduler:<10} {row['epochs']:>7} {row['stopped']:>8} {row['wall_s']:>8.1f} {best:>20} "
              f"{row['best_val_acc1']:>10.3f}")
    full, asha = rows["none"], rows["asha"]
    print(f"ASHA / full grid: epochs {asha['epochs'] / full['epochs']:.2f}, wall time {asha['wall_s'] / full['wall_s']:.2f}"
          f" (target <= 0.5); same best setting: {asha['best'] == full['best']}")
    print(f"softmax, same budget: best val top-1 {softmax.checkpoint_metrics['val_acc1']:.3f} vs center loss at the best "
          f"setting {full['best_val_acc1']:.3f}")


if __name__ == "__main__":
    main()

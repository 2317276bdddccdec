"""What ASHA saves: the same seeded lambda/alpha samples swept with ASHA and without, in one run.

Reports, for each scheduler, the total epochs trained, the wall time and the best val top-1, and
the ratios ASHA / no-ASHA. Both sweeps draw the same trials (same search seed), so the difference
is only what early stopping cut.

    python bench/tune_efficiency.py [--dataset DIR] [--samples 6] [--epochs 4] [--image-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ray_jobs.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    SweepConfig,
    TrainConfig,
)
from ray_jobs.tune import run_sweep

REPO = Path(__file__).resolve().parents[1]


def _ingested_sample(workdir: Path) -> str:
    from tasks.ingest import IngestConfig, ingest

    out = workdir / "food-sample"
    ingest(IngestConfig(src=str(REPO / "data" / "food-sample"), out=str(out), max_side=64))
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="ingested dataset (default: the bundled sample, ingested to a temp dir)")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        workdir = Path(tmp)
        dataset = args.dataset or _ingested_sample(workdir)
        train = TrainConfig(
            data=DataConfig(dataset=dataset, image_size=args.image_size, batch_size=32, loader_workers=0),
            model=ModelConfig(feat_dim=64),
            loss=LossConfig(kind="center"),
            optim=OptimConfig(epochs=args.epochs, warmup_epochs=0),
            scaling=ScalingConfig(num_workers=1, cpus_per_worker=args.cpus_per_worker),
            run=RunConfig(storage_path=str(workdir / "runs"), seed=0),
        )
        rows = {}
        for scheduler in ("none", "asha"):
            cfg = SweepConfig(train=train, name=f"bench-{scheduler}", num_samples=args.samples, scheduler=scheduler,
                              grace_period=1, reduction_factor=2, report_dir=str(workdir / "sweeps"))
            start = time.perf_counter()
            result = run_sweep(cfg)
            rows[scheduler] = {
                "epochs": int(result.table["epochs"].sum()),
                "stopped": int((result.table["status"] == "stopped early").sum()),
                "wall_s": time.perf_counter() - start,
                "best_val_acc1": result.best_val_acc1,
            }

    print(f"{args.samples} trials x {args.epochs} epochs, 1 worker per trial, image {args.image_size} px")
    print(f"{'scheduler':<10} {'epochs':>7} {'stopped':>8} {'wall s':>8} {'best val top-1':>15}")
    for scheduler, row in rows.items():
        print(f"{scheduler:<10} {row['epochs']:>7} {row['stopped']:>8} {row['wall_s']:>8.1f} {row['best_val_acc1']:>15.3f}")
    none, asha = rows["none"], rows["asha"]
    print(f"ASHA / none: epochs {asha['epochs'] / none['epochs']:.2f}, wall time {asha['wall_s'] / none['wall_s']:.2f}, "
          f"best val top-1 {asha['best_val_acc1'] - none['best_val_acc1']:+.3f}")


if __name__ == "__main__":
    main()

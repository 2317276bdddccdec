"""Scale-out: 2 workers on 2 one-CPU Ray nodes against 1 worker on one, at the same global batch, in one run.

A real multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head without CPUs and two
nodes of 1 CPU each), the real training path (`ray_jobs.training.trainer.fit`: Parquet shards, decode and
augment, DDP with the per-step center all-reduce). `--batch-size` is the global batch, so both runs
take the same optimizer steps on the same global batches: the 2-worker run computes each step in
two halves. Reported: the global images per second of the training epochs after the first
(start-up and first-touch costs excluded) and the last epoch's val top-1 of each run, runs
interleaved 1/2/1/2 so drift on a noisy machine hits both. Target: 2-worker / 1-worker >= 1.7.

    python bench/scaling.py [--image-size 128] [--batch-size 64] [--rows 512] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from ray_jobs.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
from ray_jobs.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]


def _ingest(workdir: Path, max_side: int) -> str:
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    return ingest(IngestConfig(src=str(REPO / "data" / "food-sample"), out=str(workdir / "data"), max_side=max_side)).out


def train(cfg: TrainConfig, workers: int, name: str) -> tuple[float, float]:
    """Mean global train images/s over the epochs after the first, and the last epoch's val top-1."""
    cfg = cfg.model_copy(update={
        "scaling": cfg.scaling.model_copy(update={"num_workers": workers, "placement": "spread"}),
        "run": cfg.run.model_copy(update={"name": name}),
    })
    history = fit(cfg).history
    return statistics.mean(epoch["train_images_per_s"] for epoch in history[1:]), history[-1]["val_acc1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="global: split over the workers")
    parser.add_argument("--rows", type=int, default=512, help="train rows used (limit_per_split)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                data=DataConfig(dataset=_ingest(Path(tmp), max_side=args.image_size * 2), image_size=args.image_size,
                                batch_size=args.batch_size, loader_workers=0, limit_per_split=args.rows),
                model=ModelConfig(arch="efficientnet_lite0"),  # pretrained, the backbone of its figures
                loss=LossConfig(kind="center"),
                optim=OptimConfig(epochs=args.epochs),
                scaling=ScalingConfig(cpus_per_worker=1),
                run=RunConfig(storage_path=f"{tmp}/runs", ray_address=cluster.address),
            )
            rates: dict[int, list[float]] = {1: [], 2: []}
            top1: dict[int, list[float]] = {1: [], 2: []}
            for repeat in range(args.repeats):
                for workers in (1, 2):
                    rate, acc = train(cfg, workers, f"w{workers}-r{repeat}")
                    rates[workers].append(rate)
                    top1[workers].append(acc)
                    print(f"repeat {repeat}: {workers} worker(s) on {workers} node(s): {rate:.1f} img/s, "
                          f"val top-1 {acc:.3f}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    one, two = statistics.mean(rates[1]), statistics.mean(rates[2])
    print(f"\n| setup | images/s (mean of {args.repeats}) | last val top-1 per repeat |\n|---|---|---|")
    for workers, label in ((1, "1 worker, 1 node of 1 CPU"), (2, "2 workers, 2 nodes of 1 CPU")):
        accs = " / ".join(f"{acc:.3f}" for acc in top1[workers])
        print(f"| {label} | {statistics.mean(rates[workers]):.1f} | {accs} |")
    print(f"\nscaling ratio 2/1: {two / one:.2f} (target >= 1.7); "
          f"Lite0 {args.image_size} px, global batch {args.batch_size}, center loss, {args.rows} rows, "
          f"epochs 2-{args.epochs} of each run")


if __name__ == "__main__":
    main()

"""The training data path against Ray Data, on one node: images per second and peak memory.

Both feed one training worker the same epoch of augmented batches (decode, random resized crop,
flip, normalise) from the same ingested Parquet shards, with 2 decode processes:

- `reader` (the chosen path, `ray_jobs.data`): this rank's share of the seeded order through a
  map-style dataset that reads one Parquet row group at a time, decoded in 2 DataLoader workers.
- `ray-data`: `ray.data.read_parquet` -> `map_batches` (decode + augment as a Ray Data operator,
  2 concurrent tasks) -> `iter_torch_batches`, as Ray's TorchTrainer examples feed a worker.

Each path runs in its own fresh process (after one warm-up epoch); memory is the peak, sampled
every 0.2 s, of the summed proportional resident memory (PSS: shared pages split between the
processes sharing them) of every process doing the work (the consumer and its
loader workers; for Ray Data the driver and the Ray worker processes of the session), plus Ray's
object store use. No model: this measures the feeding alone.

    python bench/data_path.py [--source ../shared/data/food101_mini10] [--image-size 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak summed PSS of this process, its children and (optionally) every `ray::` process, sampled in a thread."""

    def __init__(self, include_ray_workers: bool) -> None:
        self.include_ray_workers = include_ray_workers
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> set[int]:
        """This process, its descendants and (optionally) every `ray::` worker, from /proc (Linux)."""
        parents: dict[int, int] = {}
        ray_workers: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                if self.include_ray_workers and Path(f"/proc/{entry}/cmdline").read_bytes().startswith(b"ray::"):
                    ray_workers.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        mine = {os.getpid()}
        grew = True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in mine} - mine
            grew = bool(children)
            mine |= children
        return mine | ray_workers

    @staticmethod
    def _rss(pid: int) -> int:
        """Proportional set size: shared pages (torch's libraries) split between the processes sharing them."""
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._rss(pid) for pid in self._pids()))
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _reader_epoch(dataset: str, image_size: int, batch_size: int, epoch: int) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ray_jobs.data.parquet import ParquetImageDataset
    from ray_jobs.data.sampler import SeededShardSampler
    from ray_jobs.data.transforms import train_transform
    from ray_jobs.model.inputs import backbone_inputs

    augment = train_transform(image_size=image_size, norm=backbone_inputs("efficientnet_lite0").norm, min_crop_scale=0.35)
    split = ParquetImageDataset(dataset, "train", augment)
    sampler = SeededShardSampler(split.blocks, 0, 1, seed=0, global_batch=batch_size)
    sampler.set_epoch(epoch)
    loader = DataLoader(split, sampler=sampler, batch_size=batch_size, num_workers=2,
                        multiprocessing_context="forkserver")
    seen = 0
    for images, labels in loader:
        assert images.dtype == torch.float32 and images.shape[-1] == image_size
        seen += len(labels)
    return seen


def _ray_data_epoch(dataset: str, image_size: int, batch_size: int, epoch: int) -> int:
    import numpy as np
    import ray
    import torch

    from ray_jobs.data.decode import decode_rgb
    from ray_jobs.data.transforms import train_transform
    from ray_jobs.dataset_format import shard_paths as _shard_paths
    from ray_jobs.model.inputs import backbone_inputs

    augment = train_transform(image_size=image_size, norm=backbone_inputs("efficientnet_lite0").norm, min_crop_scale=0.35)

    def decode_and_augment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [augment(decode_rgb(bytes(data), "ray data row")).numpy() for data in batch["image"]]
        return {"image": np.stack(images), "label": batch["label"]}

    _, paths = _shard_paths(dataset, "train")
    data = ray.data.read_parquet(paths, columns=["image", "label"]).random_shuffle(seed=epoch)
    data = data.map_batches(decode_and_augment, batch_size=batch_size, concurrency=2)
    seen = 0
    for batch in data.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.long}):
        assert batch["image"].shape[-1] == image_size
        seen += len(batch["label"])
    return seen


def run_one(path: str, dataset: str, image_size: int, batch_size: int) -> dict[str, float]:
    """In this (fresh) process: one warm-up epoch, then one measured epoch."""
    if path == "ray-data":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=2 * 2**30)
        ray.data.DataContext.get_current().enable_progress_bars = False
    epoch = _ray_data_epoch if path == "ray-data" else _reader_epoch
    epoch(dataset, image_size, batch_size, epoch=0)
    with PeakMemory(include_ray_workers=path == "ray-data") as memory:
        start = time.perf_counter()
        seen = epoch(dataset, image_size, batch_size, epoch=1)
        seconds = time.perf_counter() - start
    store = 0.0
    if path == "ray-data":
        import ray

        store = ray.cluster_resources().get("object_store_memory", 0.0) - ray.available_resources().get("object_store_memory", 0.0)
        ray.shutdown()
    return {"images": seen, "seconds": seconds, "images_per_s": seen / seconds, "peak_pss_mib": memory.peak / 2**20,
            "object_store_mib_at_end": store / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "food101_mini10"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--run-one", choices=["reader", "ray-data"], help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args.dataset, args.image_size, args.batch_size)))
        return

    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    with tempfile.TemporaryDirectory() as tmp:
        dataset = ingest(IngestConfig(src=args.source, out=f"{tmp}/data")).out  # photos as stored
        split_mib = sum(p.stat().st_size for p in Path(dataset, "train").iterdir()) / 2**20
        results = {}
        for path in ("reader", "ray-data", "reader", "ray-data"):
            done = subprocess.run(
                [sys.executable, __file__, "--run-one", path, "--dataset", dataset,
                 "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)],
                capture_output=True, text=True, check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{path} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.setdefault(path, []).append(result)
            print(f"{path}: {result}", flush=True)

    print(f"\ntrain split {split_mib:.0f} MiB of encoded images; {args.image_size} px, batch {args.batch_size}, "
          "2 decode processes; mean of 2 fresh processes each\n")
    print("| path | images/s | peak memory, PSS (MiB) |\n|---|---|---|")
    for path, runs in results.items():
        rate = sum(r["images_per_s"] for r in runs) / len(runs)
        rss = max(r["peak_pss_mib"] for r in runs)
        print(f"| {path} | {rate:.1f} | {rss:.0f} |")
    reader, ray_data = (sum(r["images_per_s"] for r in results[p]) / 2 for p in ("reader", "ray-data"))
    print(f"\nreader / ray-data images/s: {reader / ray_data:.2f}")


if __name__ == "__main__":
    main()

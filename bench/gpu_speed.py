"""GPU feeding and loss cost at 224 px, center loss, for ResNet-18 and the pretrained default (Lite0).

Per arch, on one device, through the training engine (`ray_jobs.training.engine.train_one_epoch`: AMP,
channels_last): images/s fed from the Parquet shards (decode + augment in DataLoader workers)
against synthetic tensors already on the device (the ceiling), and the step time of center loss
against softmax on those tensors, A/B interleaved. Run by `bench/gpu.sh`; `--device cpu --steps 2`
only checks that it runs.

    python bench/gpu_speed.py [--device cuda] [--batch-size 128] [--steps 40] [--loader-workers 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ray_jobs.config import LossConfig, ModelConfig, OptimConfig
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.data.sampler import SeededShardSampler
from ray_jobs.data.transforms import train_transform
from ray_jobs.model.inputs import backbone_inputs
from ray_jobs.model.foodnet import build_model, head_for_loss
from ray_jobs.training.engine import train_one_epoch
from ray_jobs.training.losses import build_objective
from ray_jobs.training.optim import build_optimizer, build_scheduler, parameter_groups

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224


class DeviceTensors:
    """`steps` batches of one random batch already on the device: feeding costs nothing."""

    def __init__(self, batch: int, classes: int, steps: int, device: torch.device) -> None:
        self.images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        self.labels = torch.randint(0, classes, (batch,), device=device)
        self.steps = steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)

    def __len__(self) -> int:
        return self.steps


def images_per_s(arch: str, kind: str, loader, device: torch.device, classes: int) -> float:
    """One warm-up pass, then the engine's own images/s over a second pass of `loader`."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=arch, pretrained=arch == "efficientnet_lite0")
    model = build_model(model_cfg, classes, head_for_loss(kind)).to(device).to(memory_format=torch.channels_last)
    objective = build_objective(LossConfig(kind=kind), classes, model_cfg.feat_dim, device)
    optimizer = build_optimizer(OptimConfig(), parameter_groups(model, 1e-3, 0.3, OptimConfig().weight_decay))
    scheduler = build_scheduler(OptimConfig(), optimizer, len(loader))
    train_one_epoch(model, objective, optimizer, scheduler, loader, device, epoch=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return train_one_epoch(model, objective, optimizer, scheduler, loader, device, epoch=2)["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps per measured pass")
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--ab-rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    with tempfile.TemporaryDirectory() as tmp:
        dataset = ingest(IngestConfig(src=str(REPO / "data" / "food-sample"), out=f"{tmp}/data")).out
        rows = []
        for arch in ("resnet18", "efficientnet_lite0"):
            augment = train_transform(image_size=IMAGE_SIZE, norm=backbone_inputs(arch).norm, min_crop_scale=0.35)
            split = ParquetImageDataset(dataset, "train", augment)
            wanted = args.batch_size * args.steps  # the sample repeated to fill the measured pass
            sampler = SeededShardSampler(split.blocks, 0, 1, seed=0, global_batch=args.batch_size)
            keys = (list(sampler) * (wanted // len(split) + 1))[:wanted]
            parquet = DataLoader(Subset(split, keys), batch_size=args.batch_size, num_workers=args.loader_workers,
                                 pin_memory=device.type == "cuda", drop_last=True,
                                 persistent_workers=args.loader_workers > 0)
            classes = len(set(split.labels.tolist()))
            synthetic = DeviceTensors(args.batch_size, classes, args.steps, device)
            fed = images_per_s(arch, "center", parquet, device, classes)
            ceiling = images_per_s(arch, "center", synthetic, device, classes)
            center, softmax = [], []
            for _ in range(args.ab_rounds):
                for kind, out in (("softmax", softmax), ("center", center)):
                    out.append(args.batch_size / images_per_s(arch, kind, synthetic, device, classes))
            rows.append((arch, fed, ceiling, statistics.median(softmax), statistics.median(center)))
            print(f"{time.strftime('%T')} {arch} done", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, {IMAGE_SIZE} px, batch {args.batch_size}, {args.steps} steps a pass, "
          f"{args.loader_workers} loader workers, center loss unless stated\n")
    print("| arch | Parquet-fed img/s | synthetic img/s | fed / synthetic | softmax step ms | center step ms | center / softmax |")
    print("|---|---|---|---|---|---|---|")
    for arch, fed, ceiling, softmax, center in rows:
        print(f"| {arch} | {fed:.0f} | {ceiling:.0f} | {fed / ceiling:.2f} | {1e3 * softmax:.1f} | {1e3 * center:.1f} "
              f"| {center / softmax:.3f} |")


if __name__ == "__main__":
    main()

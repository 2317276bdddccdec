"""Training step speed of the memory formats on this machine, in one run: why the loop uses channels_last.

Times forward + backward + AdamW step of each arch on a fixed synthetic batch, contiguous (NCHW)
against channels_last (NHWC), alternating the two twice so drift on a noisy machine hits both, and
prints images per second and the ratio channels_last / contiguous.

    python bench/cpu_speed.py [--batch 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ray_jobs.config import ModelConfig
from ray_jobs.model.foodnet import build_model

CASES = (("efficientnet_lite0", 224), ("efficientnet_lite0", 128), ("resnet18", 64))


def images_per_s(model: nn.Module, size: int, memory_format: torch.memory_format, batch: int, steps: int) -> float:
    """Training images per second after one warm-up step."""
    model = model.to(memory_format=memory_format).train()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images)[1], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'arch':<20} {'px':>4} {'NCHW img/s':>11} {'NHWC img/s':>11} {'NHWC/NCHW':>10}")
    for arch, size in CASES:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, pretrained=False), num_classes=10, head="linear")
        speeds: dict[torch.memory_format, list[float]] = {torch.contiguous_format: [], torch.channels_last: []}
        for _ in range(2):
            for memory_format, runs in speeds.items():
                runs.append(images_per_s(model, size, memory_format, args.batch, args.steps))
        nchw, nhwc = (statistics.mean(runs) for runs in speeds.values())
        print(f"{arch:<20} {size:>4} {nchw:>11.1f} {nhwc:>11.1f} {nhwc / nchw:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()

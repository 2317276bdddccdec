"""Training step speed on this machine, in one run: memory format (why the loop uses channels_last) and
precision (fp32 against bf16 autocast, what `--precision auto` picks on a CPU with native bf16).

Times forward + backward + AdamW step of each arch on a fixed synthetic batch, alternating the two
settings twice so drift on a noisy machine hits both, and prints images per second and their ratio.

    python bench/cpu_speed.py [--batch 32] [--steps 3] [--only memory|precision]
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


def images_per_s(model: nn.Module, size: int, memory_format: torch.memory_format, batch: int, steps: int,
                 bf16: bool = False) -> float:
    """Training images per second after one warm-up step (the forward under bf16 autocast if asked)."""
    model = model.to(memory_format=memory_format).train()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)[1]
        loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=("memory", "precision"), default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    if args.only != "precision":
        memory_formats(args)
    if args.only != "memory":
        precisions(args)


def precisions(args: argparse.Namespace) -> None:
    from ray_jobs.training.engine import cpu_has_bf16

    print(f"\nchannels_last; native bf16 on this CPU: {cpu_has_bf16()}")
    print(f"{'arch':<20} {'px':>4} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10}")
    for arch, size in CASES[:2]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, pretrained=False), num_classes=10, head="linear")
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):
            for bf16, runs in speeds.items():
                runs.append(images_per_s(model, size, torch.channels_last, args.batch, args.steps, bf16=bf16))
        fp32, bf16 = (statistics.mean(runs) for runs in speeds.values())
        print(f"{arch:<20} {size:>4} {fp32:>11.1f} {bf16:>11.1f} {bf16 / fp32:>9.2f}x", flush=True)


def memory_formats(args: argparse.Namespace) -> None:
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

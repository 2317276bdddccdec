"""Which precision should a model answer in? fp32 against bf16 autocast, on a real checkpoint.

For the checkpoint's test split: top-1 in each precision, the share of photos whose top class is
the same in both, and the bare forward rate (decoded, preprocessed photos, `--batch` a pass, one
thread) in each, in one run. Calibrates the checkpoint in every precision first unless it already
has them (what `evaluate` does), so `serve --precision bf16` can then serve it.

    python bench/inference_precision.py --checkpoint DIR --dataset DIR [--batch 16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.inference.calibrate import calibrate_checkpoint
from ray_jobs.inference.calibration_store import read_calibrations
from ray_jobs.inference.loading import model_from_checkpoint
from ray_jobs.inference.precision import OFFERED, autocast
from ray_jobs.model.inputs import eval_preprocessing
from ray_jobs.training.engine import Precision, predict


def forward_rate(net: torch.nn.Module, batch: torch.Tensor, precision: str, seconds: float) -> float:
    device = torch.device("cpu")
    with torch.no_grad(), autocast(precision, device):
        for _ in range(3):
            net(batch)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            net(batch)
            done += len(batch)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", required=True, help="the build the checkpoint trained on")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="per forward-rate measurement")
    args = parser.parse_args()

    loaded = model_from_checkpoint(args.checkpoint)
    if set(read_calibrations(args.checkpoint, loaded.classes, loaded.config.model.feat_dim)) != set(OFFERED):
        calibrate_checkpoint(args.checkpoint, args.dataset, loaded=loaded)
    test = ParquetImageDataset(args.dataset, "test", eval_preprocessing(loaded.config))
    device = torch.device("cpu")
    guesses, labels = {}, None
    for precision in OFFERED:
        _, logits, labels = predict(loaded.net, DataLoader(test, batch_size=50), device, Precision(device, precision))
        guesses[precision] = logits.argmax(dim=1)
    torch.set_num_threads(1)
    batch = torch.stack([test[index][0] for index in range(args.batch)])
    rates = {precision: forward_rate(loaded.net, batch, precision, args.seconds) for precision in OFFERED}
    print(f"\n{args.checkpoint}: {loaded.config.model.arch}, test split {len(labels)} photos, "
          f"{torch.get_num_threads()} thread, batch {args.batch}\n")
    print("| precision | test top-1 | same top class as fp32 | bare forward img/s |\n|---|---|---|---|")
    for precision in OFFERED:
        top1 = (guesses[precision] == labels).float().mean().item()
        same = (guesses[precision] == guesses["fp32"]).float().mean().item()
        print(f"| {precision} | {top1:.4f} | {same:.4f} | {rates[precision]:.1f} |")
    gap = 100 * ((guesses["bf16"] == labels).float().mean() - (guesses["fp32"] == labels).float().mean()).item()
    print(f"\nbf16 - fp32 test top-1: {gap:+.2f} points (target within 0.3); speed {rates['bf16'] / rates['fp32']:.2f}x")


if __name__ == "__main__":
    main()

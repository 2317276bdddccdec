"""The worker loop's evaluation under 16 gloo ranks: it finishes whatever the validation size, and it
scores exactly what one process scores.

Plain `torch.multiprocessing` + gloo, no Ray. The model has BatchNorm and is wrapped in DDP as training
wraps it, and takes one training step first: DDP's next forward would broadcast the BatchNorm
buffers, a collective that a rank with no validation rows never joins (the hang this guards against:
150 validation rows over 16 ranks left the last rank empty under `ceil(rows / world)` shares).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ray_jobs.data.sampler import rank_slice
from ray_jobs.training.engine import evaluate, share_loader, unwrap, validate

WORLD = 16
CLASSES = 3
VAL_ROWS = (1, 5, 15, 150)
TIMEOUT_S = 240


class TinyNet(nn.Module):
    """conv -> BatchNorm -> pooled features -> linear head: `(features, logits)` like FoodNet."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def val_split(rows: int) -> TensorDataset:
    """The same rows on every rank (seeded)."""
    generator = torch.Generator().manual_seed(rows)
    return TensorDataset(torch.randn(rows, 3, 8, 8, generator=generator),
                         torch.randint(0, CLASSES, (rows,), generator=generator))


def _rank(rank: int, world: int, init_method: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batch: BN statistics differ
    images, labels = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, CLASSES, (4,), generator=generator)
    model.train()
    nn.functional.cross_entropy(model(images)[1], labels).backward()
    optimizer.step()
    results = {rows: validate(model, share_loader(val_split(rows), rank, world, batch_size=2), torch.device("cpu"),
                              CLASSES) for rows in VAL_ROWS}
    torch.save({"state": unwrap(model).state_dict(), "results": results}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_validation_shares_are_balanced_and_never_empty_when_rows_cover_the_ranks() -> None:
    for rows in (1, 5, 15, 16, 150):
        sizes = [len(rank_slice(rows, rank, WORLD)) for rank in range(WORLD)]
        assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1
        assert (min(sizes) > 0) == (rows >= WORLD)
    assert [list(rank_slice(5, rank, 2)) for rank in range(2)] == [[0, 1], [2, 3, 4]]  # consecutive rows


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_sixteen_ranks_evaluate_any_validation_size_and_match_one_process(tmp_path: Path) -> None:
    context = mp.start_processes(_rank, args=(WORLD, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"evaluation on {WORLD} ranks did not finish within {TIMEOUT_S} s (a rank waits on a collective)")
    saved = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    alone = TinyNet()
    alone.load_state_dict(saved[0]["state"])  # rank 0's weights and BatchNorm statistics, as evaluation used
    for rows in VAL_ROWS:
        one = evaluate(alone, DataLoader(val_split(rows), batch_size=7), torch.device("cpu"), CLASSES)
        for rank in range(WORLD):
            got = saved[rank]["results"][rows]
            assert got.keys() == one.keys()
            for key, value in one.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (rows, rank, key)

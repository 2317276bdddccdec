"""A split of more than 2 GiB of encoded images reads row by row in bounded memory.

The old reader held a split's images in one `binary` array (32-bit offsets), so a split over
2 GiB did not load at all, and every worker held the whole split. Here 2.1 GiB of synthetic rows
(1 MiB each, numbered) are read in a fresh process, in a rank's training order and past the
2 GiB offset, and how much reading raises that process's peak resident memory (above what the
imports and the row-group index take) is compared with the split's size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
ROW_BYTES = 2**20
ROWS = 2150  # 2.10 GiB


def _row(index: int, blob: bytes) -> bytes:
    return f"row {index:06d}|".encode() + blob[: ROW_BYTES - 11]


READER = r"""
import json, resource, sys
from ray_jobs.data.parquet import ParquetImageDataset
from ray_jobs.data.sampler import SeededShardSampler
dataset = ParquetImageDataset(sys.argv[1], "train", transform=None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch, pyarrow, the index: not the images
checked = 0
for rank in (0, 1):
    sampler = SeededShardSampler(dataset.blocks, rank, 2, seed=0, global_batch=32)
    for step, (index, _) in enumerate(sampler):
        if step % 7 == 0 or index >= len(dataset) - 3:
            head = dataset.image_bytes(index)[:11]
            assert head == f"row {index:06d}|".encode(), (index, head)
            checked += 1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rows": len(dataset), "checked": checked, "peak_rss_bytes": peak, "growth_bytes": peak - before,
                  "cache_peak_bytes": dataset.cache.peak_bytes, "cache_budget_bytes": dataset.cache.budget_bytes}))
"""


@pytest.mark.slow
def test_a_split_over_2_gib_reads_in_bounded_memory(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "train").mkdir(parents=True)
    blob = bytes(range(256)) * (ROW_BYTES // 256)
    shards, per_shard = [], 64  # 64 MiB files in 8 MiB row groups, as ingest writes them
    for first in range(0, ROWS, per_shard):
        indices = range(first, min(first + per_shard, ROWS))
        table = pa.table({"image": pa.array([_row(i, blob) for i in indices], pa.binary()),
                          "label": pa.array([i % 2 for i in indices], pa.int32())})
        name = f"train/part-{len(shards):05d}.parquet"
        pq.write_table(table, root / name, row_group_size=8, compression="none", use_dictionary=False)
        shards.append(name)
    manifest = {"classes": ["a", "b"], "shards": {"train": shards}, "counts": {"train": {"a": ROWS}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    split_bytes = sum(p.stat().st_size for p in (root / "train").iterdir())
    assert split_bytes > 2**31

    try:
        done = subprocess.run([sys.executable, "-c", READER, str(root)], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
    finally:
        shutil.rmtree(root)  # 2 GiB that pytest would otherwise keep for its last three sessions
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == ROWS and report["checked"] > ROWS // 7
    assert report["cache_peak_bytes"] <= report["cache_budget_bytes"]
    growth = report["growth_bytes"]
    assert growth < 2**29, f"reading grew the peak RSS by {growth / 2**20:.0f} MiB for a {split_bytes / 2**30:.2f} GiB split"

"""How close is `ingest()` to the cost of just decoding the images?

Times, on the same files and with the same number of processes, (1) a plain Pillow decode
(open + load in a spawn ProcessPoolExecutor) and (2) the full `tasks.ingest.ingest()` (scan,
hash, decode, split, Parquet write, atomic publish). The ratio of their speeds shows what the
bookkeeping costs on top of the unavoidable decode. Files are read once beforehand so that
neither run pays for a cold disk cache; the two runs alternate `--repeat` times and the best
time of each counts (on a shared machine the best run is the least disturbed one).

    python bench/ingest.py [--src DIR] [--workers N] [--max-side N] [--out DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "food101_mini10"
SAMPLE = REPO / "data" / "food-sample"


def decode_only(path: str) -> tuple[int, int]:
    """The baseline: what any reader must do at least once per image."""
    with Image.open(path) as image:
        image.load()
        return image.size


def time_decode(paths: list[str], workers: int) -> float:
    """Seconds to decode every path in `workers` spawned processes (pool start-up included)."""
    start = time.perf_counter()
    if workers == 1:
        list(map(decode_only, paths))
    else:
        chunk = max(1, min(64, len(paths) // (workers * 8)))  # same chunking as tasks.ingest
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            list(pool.map(decode_only, paths, chunksize=chunk))
    return time.perf_counter() - start


def time_ingest(src: Path, out: Path, workers: int, max_side: int | None) -> tuple[float, dict]:
    """Seconds for a full ingest into an empty folder (builds are immutable: the old one is removed first)."""
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = ingest(IngestConfig(src=src, out=str(out), workers=workers, max_side=max_side))
    return time.perf_counter() - start, result.manifest


def image_paths(src: Path) -> list[str]:
    """The files ingest would decode (same scan, problems excluded)."""
    from ray_jobs.data.image_prep import MAX_FILE_BYTES
    from tasks.ingest.scan import scan_source

    tree = scan_source(src, MAX_FILE_BYTES)  # ingest's default limit
    return [str(tree.root / f.rel_path) for f in tree.files if not f.problem]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SHARED if SHARED.is_dir() else SAMPLE)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-side", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ingest-dataset")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds; the best time counts")
    args = parser.parse_args()

    paths = image_paths(args.src)
    megabytes = sum(len(Path(p).read_bytes()) for p in paths) / 1e6  # also warms the page cache
    decode_times, ingest_times = [], []
    for _ in range(args.repeat):
        decode_times.append(time_decode(paths, args.workers))
        seconds, manifest = time_ingest(args.src, args.out, args.workers, args.max_side)
        ingest_times.append(seconds)
    decode_s, ingest_s = min(decode_times), min(ingest_times)
    shard_mb = sum(f.stat().st_size for f in args.out.rglob("*.parquet")) / 1e6

    print(f"\nsource: {args.src} ({len(paths)} images, {megabytes:.1f} MB); "
          f"workers={args.workers}, max_side={args.max_side}, best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<24}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for name, seconds in (("decode only (Pillow)", decode_s), ("ingest() end to end", ingest_s)):
        print(f"{name:<24}{len(paths):>8}{seconds:>10.2f}{len(paths) / seconds:>10.1f}")
    print(f"ratio ingest/decode (speed): {decode_s / ingest_s:.2f}")
    print(f"output: {manifest['rows_written']} rows, {shard_mb:.1f} MB of Parquet at {args.out}")


if __name__ == "__main__":
    main()

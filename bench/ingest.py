"""How close is `train-food ingest` to the cost of just decoding the images?

Times, on the same files and with the same number of processes, each as a fresh process the way a
user starts it: (1) a plain Pillow decode (open + load in a spawn ProcessPoolExecutor) and (2)
`train-food ingest SRC --out DIR` with its default options (scan, the one read of each file that
hashes, decodes and spools it, the fingerprint, split, Parquet write, atomic publish), into an
empty DIR. The ratio of their speeds shows what the bookkeeping costs on top of the unavoidable
decode. Files are read once beforehand so that neither run pays for a cold disk cache; the two
runs alternate `--repeat` times and the best time of each counts (on a shared machine the best
run is the least disturbed one). A rerun on the unchanged source (known from the source index,
no file read) is timed too. Dirty pages are written back before each timed run (`os.sync`), so a
round's 100 MB of output is not written back during the next run; every round's times are printed.

    python bench/ingest.py [--src DIR] [--workers N] [--max-side N] [--out DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
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


def decode_all(paths: list[str], workers: int) -> None:
    """Decode every path in `workers` spawned processes (pool start-up included)."""
    if workers == 1:
        list(map(decode_only, paths))
        return
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(decode_only, paths, chunksize=chunk))


def timed(command: list[str]) -> float:
    """Seconds for `command` as a fresh process (interpreter start and imports included).

    With Python's bytecode cache as a user's machine has it: the baseline imports only installed
    packages, compiled when installed, while `train-food` imports some forty of this project's
    modules, which a shell with PYTHONDONTWRITEBYTECODE set (this sandbox's) would recompile on
    every run (about 0.1 s of CPU); the first round writes the cache, and the best round counts.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    os.sync()  # the last round's 100 MB of output is written back now, not during this run
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def ingest_command(src: Path, out: Path, workers: int, max_side: int | None) -> list[str]:
    command = [str(Path(sys.executable).parent / "train-food"), "ingest", str(src), "--out", str(out),
               "--workers", str(workers)]
    return command + (["--max-side", str(max_side)] if max_side else [])


def image_paths(src: Path) -> list[str]:
    """The files ingest would decode (same scan, problems excluded)."""
    from ray_jobs.data.image_prep import MAX_FILE_BYTES
    from tasks.ingest.scan import scan_source

    tree = scan_source(src, MAX_FILE_BYTES)  # ingest's default limit
    return [str(tree.root / f.rel_path) for f in tree.files if not f.problem]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SHARED if SHARED.is_dir() else SAMPLE)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="default: ingest's own default")
    parser.add_argument("--max-side", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ingest-dataset")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds; the best time counts")
    parser.add_argument("--decode-only", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    if args.decode_only:
        decode_all(args.decode_only.read_text().splitlines(), args.workers)
        return

    paths = image_paths(args.src)
    megabytes = sum(len(Path(p).read_bytes()) for p in paths) / 1e6  # also warms the page cache
    listing = args.out.parent / "ingest-bench-paths.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(paths))
    baseline = [sys.executable, __file__, "--decode-only", str(listing), "--workers", str(args.workers)]
    decode_times, ingest_times, rerun_times = [], [], []
    for _ in range(args.repeat):
        decode_times.append(timed(baseline))
        shutil.rmtree(args.out, ignore_errors=True)  # builds are immutable: a fresh DIR each round
        ingest_times.append(timed(ingest_command(args.src, args.out, args.workers, args.max_side)))
        rerun_times.append(timed(ingest_command(args.src, args.out, args.workers, args.max_side)))
    decode_s, ingest_s, rerun_s = min(decode_times), min(ingest_times), min(rerun_times)
    manifest = json.loads((args.out / "manifest.json").read_text())
    shard_mb = sum(f.stat().st_size for f in args.out.rglob("*.parquet")) / 1e6

    print(f"\nsource: {args.src} ({len(paths)} images, {megabytes:.1f} MB); "
          f"workers={args.workers}, max_side={args.max_side}, best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; each a fresh process")
    print(f"{'run':<40}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for name, seconds in (("decode only (Pillow pool)", decode_s), ("train-food ingest, empty DIR", ingest_s),
                          ("train-food ingest, rerun (up to date)", rerun_s)):
        print(f"{name:<40}{len(paths):>8}{seconds:>10.2f}{len(paths) / seconds:>10.1f}")
    paired = statistics.median(d / i for d, i in zip(decode_times, ingest_times, strict=True))
    print(f"ratio ingest/decode (speed): {decode_s / ingest_s:.2f} best against best; median of the rounds' "
          f"ratios {paired:.2f}")
    print("every round (decode, ingest, rerun): " + "; ".join(
        f"{d:.2f} {i:.2f} {r:.2f}" for d, i, r in zip(decode_times, ingest_times, rerun_times, strict=True)))
    print(f"output: {manifest['rows_written']} rows, {shard_mb:.1f} MB of Parquet at {args.out}")


if __name__ == "__main__":
    main()

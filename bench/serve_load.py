"""Load test of `train-food serve` on loopback: does `@serve.batch` pay for itself?

Deploys the Serve app (one replica, 1 CPU) with a checkpoint, then sends a fixed number of
`POST /predict` requests (sample test photos, raw bytes) from 1, 8 and 32 concurrent clients,
first with batching (`--max-batch-size`, default 16) and then without (max batch size 1), and
prints requests per second and p50/p95 latency as a markdown table, plus the batched/unbatched
throughput ratio at 32 clients (target >= 1.5). With `--limits`, instead: 32 clients against the
serving limits off (no queue bound, no timeouts) and on (the defaults), batched, in one run, with
200s and 503s counted apart and p99 latency. Stops by itself. Without `--checkpoint` it trains
its own model first (ResNet-18 from scratch, 1 epoch on 32 images of the sample, at 128 px).

    python bench/serve_load.py [--checkpoint PATH] [--requests 192] [--max-batch-size 16] [--limits]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ray_jobs.serving.config import ServeConfig

REPO = Path(__file__).resolve().parents[1]
CLIENTS = (1, 8, 32)


def _trained_checkpoint(workdir: Path, image_size: int) -> str:
    from ray_jobs.config import DataConfig, ModelConfig, OptimConfig, RunConfig, ScalingConfig, TrainConfig
    from ray_jobs.training.trainer import fit
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.pipeline import ingest

    dataset = ingest(IngestConfig(src=str(REPO / "data" / "food-sample"), out=str(workdir / "dataset"))).out
    cfg = TrainConfig(
        data=DataConfig(dataset=dataset, image_size=image_size, batch_size=16, loader_workers=0, limit_per_split=32),
        model=ModelConfig(arch="resnet18", pretrained=False),
        optim=OptimConfig(name="sgd", lr=0.05, epochs=1, warmup_epochs=0),
        scaling=ScalingConfig(num_workers=0),
        run=RunConfig(storage_path=str(workdir / "runs"), name="serve-bench", seed=0),
    )
    return fit(cfg).best_checkpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _load(url: str, photos: list[bytes], clients: int, requests: int) -> dict[str, float]:
    """`requests` POSTs shared by `clients` concurrent loops: throughput, latency and answers by status."""
    latencies: list[float] = []
    statuses: list[int] = []
    remaining = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for index in remaining:  # one shared iterator: the loops stop together after `requests`
            start = time.perf_counter()
            response = await http.post(url, content=photos[index % len(photos)])
            latencies.append(time.perf_counter() - start)
            statuses.append(response.status_code)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    other = [code for code in statuses if code not in (200, 503)]
    if other:
        raise RuntimeError(f"unexpected answers {sorted(set(other))} from {url}")
    return {"rps": requests / elapsed, "p50": statistics.median(latencies) * 1000, "p95": cuts[94] * 1000,
            "p99": cuts[98] * 1000, "ok": statuses.count(200), "busy": statuses.count(503)}


UNBOUNDED = {"max_queued_requests": 10**9, "request_timeout_s": 1e9, "body_timeout_s": 1e9, "decode_timeout_s": 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: train a small one first)")
    parser.add_argument("--image-size", type=int, default=128, help="image size of the model trained here")
    parser.add_argument("--requests", type=int, default=192, help="requests per cell of the table")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--limits", action="store_true", help="compare the serving limits off and on at 32 clients")
    args = parser.parse_args()

    import ray
    from ray import serve

    from ray_jobs.serving.app import start

    photos = [path.read_bytes() for path in sorted((REPO / "data" / "food-sample" / "test").glob("*/*.jpg"))]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        checkpoint = args.checkpoint or _trained_checkpoint(Path(scratch), args.image_size)
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        port = _free_port()
        url = f"http://127.0.0.1:{port}/predict"
        rows = []
        modes = ((("limits off", args.max_batch_size, UNBOUNDED), ("limits on", args.max_batch_size, {}))
                 if args.limits else (("batched", args.max_batch_size, {}), ("unbatched", 1, {})))
        for label, batch, limits in modes:
            start(ServeConfig(model=str(Path(checkpoint).resolve()), port=port, max_batch_size=batch,
                              batch_wait_timeout_s=args.batch_wait_timeout_s, min_replicas=1, max_replicas=1,
                              **limits))
            asyncio.run(_load(url, photos, 4, 16))  # warm-up
            for clients in ((32,) if args.limits else CLIENTS):
                rows.append((label, batch, clients, asyncio.run(_load(url, photos, clients, args.requests))))
                print(f"{label} {clients} clients: {rows[-1][3]['rps']:.1f} req/s", flush=True)
            serve.delete("train-food")
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.requests} requests per row, 1 replica (1 CPU), checkpoint {checkpoint}\n")
    print("| mode | max batch | clients | req/s | p50 ms | p95 ms | p99 ms | 200 | 503 |\n|---|---|---|---|---|---|---|---|---|")
    for label, batch, clients, cell in rows:
        print(f"| {label} | {batch} | {clients} | {cell['rps']:.1f} | {cell['p50']:.0f} | {cell['p95']:.0f} "
              f"| {cell['p99']:.0f} | {cell['ok']} | {cell['busy']} |")
    if not args.limits:
        at_32 = {label: cell["rps"] for label, _, clients, cell in rows if clients == 32}
        print(f"\nbatched / unbatched throughput at 32 clients: {at_32['batched'] / at_32['unbatched']:.2f}x "
              "(target >= 1.5)")
    else:
        at_32 = {label: cell["rps"] for label, _, _, cell in rows}
        print(f"\nlimits on / off throughput at 32 clients: {at_32['limits on'] / at_32['limits off']:.2f}x")


if __name__ == "__main__":
    main()

"""Load test of `train-food serve` on loopback: does serving keep up with its model?

First measures the model's bare batched forward rate (`--max-batch-size` photos a pass, already
decoded and preprocessed, in the served precision, with the replica's one thread, on the CPU the
replica will get). Then deploys the Serve app (one replica, 1 CPU, pinned to CPU 0; this client
pinned to CPU 1) and sends `--requests` `POST /predict` requests (sample test photos, raw bytes)
from 1, 8 and 32 concurrent clients, with batching (`--max-batch-size`, default 16) and without
(max batch size 1), and prints requests per second, p50/p95/p99 latency and 200s and 503s as a
markdown table, the replica's own breakdown of the 32-client batched row (`GET /stats`: read,
decode, queue, forward), and the targets: served throughput at 32 clients at least 0.7 of the bare
forward rate; unbatched throughput at 32 clients not below its 1-client figure. With `--limits`,
instead: 32 clients against the serving limits off (no queue bound, no timeouts) and on (the
defaults), batched. Stops by itself. Without `--checkpoint` it trains its own model first
(ResNet-18 from scratch, 1 epoch on 32 images of the sample, at 128 px).

    python bench/serve_load.py [--checkpoint PATH] [--requests 1000] [--precision auto] [--limits]
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    return fit(cfg).checkpoint


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
REPLICA_CPU, CLIENT_CPU = 0, 1


def bare_forward_rate(checkpoint: str, precision: str, batch: int, photos: list[bytes], seconds: float = 20.0
                      ) -> tuple[float, str]:
    """Images per second of the model alone: batches of decoded, preprocessed photos, one thread, as served."""
    import torch
    from inference_precision import forward_rate  # bench/, beside this script

    from ray_jobs.data.decode import decode_photo
    from ray_jobs.inference.loading import load_model
    from ray_jobs.model.inputs import eval_preprocessing

    model = load_model(checkpoint, precision=precision)
    torch.set_num_threads(1)
    transform = eval_preprocessing(model.config)
    tensors = torch.stack([transform(decode_photo(data, "photo")) for data in photos[:batch]])
    return forward_rate(model.net, tensors, model.precision, seconds), model.precision


def pin_replica(app: str, cpu: int) -> int:
    """Pin every thread of the app's replica process to `cpu` (Ray reserves a CPU, it does not pin one)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"ServeReplica:{app}:Classifier" in title:
            for task in (entry / "task").iterdir():
                os.sched_setaffinity(int(task.name), {cpu})
            return int(entry.name)
    raise RuntimeError(f"no replica process of {app} found")


def stage_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per stage: count and mean ms of the requests between two `GET /stats` answers."""
    delta = {}
    for stage, now in after["stages"].items():
        then = before["stages"].get(stage, {"count": 0, "seconds": 0.0})
        count, seconds = now["count"] - then["count"], now["seconds"] - then["seconds"]
        delta[stage] = {"count": count, "seconds": seconds, "mean_ms": 1000 * seconds / max(count, 1)}
    return delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: train a small one first)")
    parser.add_argument("--image-size", type=int, default=128, help="image size of the model trained here")
    parser.add_argument("--requests", type=int, default=1000, help="requests per row of the table")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--limits", action="store_true", help="compare the serving limits off and on at 32 clients")
    args = parser.parse_args()

    import ray
    from ray import serve

    from ray_jobs.serving.app import start

    photos = [path.read_bytes() for path in sorted((REPO / "data" / "food-sample" / "test").glob("*/*.jpg"))]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        checkpoint = str(Path(args.checkpoint or _trained_checkpoint(Path(scratch), args.image_size)).resolve())
        os.sched_setaffinity(0, {REPLICA_CPU})
        bare, precision = bare_forward_rate(checkpoint, args.precision, args.max_batch_size, photos)
        print(f"bare forward: {bare:.1f} img/s ({precision}, 1 thread, batch {args.max_batch_size})", flush=True)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # Ray's processes must not inherit the pin
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        os.sched_setaffinity(0, {CLIENT_CPU})  # the client: the CPU the replica does not reserve
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        rows, breakdown = [], {}
        modes = ((("limits off", args.max_batch_size, UNBOUNDED), ("limits on", args.max_batch_size, {}))
                 if args.limits else (("batched", args.max_batch_size, {}), ("unbatched", 1, {})))
        for label, batch, limits in modes:
            start(ServeConfig(model=checkpoint, port=port, max_batch_size=batch, precision=args.precision,
                              batch_wait_timeout_s=args.batch_wait_timeout_s, min_replicas=1, max_replicas=1,
                              **limits))
            pin_replica("train-food", REPLICA_CPU)
            asyncio.run(_load(f"{base}/predict", photos, 4, 32))  # warm-up
            for clients in ((32,) if args.limits else CLIENTS):
                before = httpx.get(f"{base}/stats", timeout=30).json()
                rows.append((label, batch, clients, asyncio.run(_load(f"{base}/predict", photos, clients,
                                                                      args.requests))))
                breakdown[(label, clients)] = stage_delta(before, httpx.get(f"{base}/stats", timeout=30).json())
                print(f"{label} {clients} clients: {rows[-1][3]['rps']:.1f} req/s", flush=True)
            serve.delete("train-food")
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.requests} requests per row, 1 replica (1 CPU, pinned to CPU {REPLICA_CPU}; client on CPU "
          f"{CLIENT_CPU}), {precision}, checkpoint {checkpoint}\n")
    print("| mode | max batch | clients | req/s | p50 ms | p95 ms | p99 ms | 200 | 503 |\n|---|---|---|---|---|---|---|---|---|")
    for label, batch, clients, cell in rows:
        print(f"| {label} | {batch} | {clients} | {cell['rps']:.1f} | {cell['p50']:.0f} | {cell['p95']:.0f} "
              f"| {cell['p99']:.0f} | {cell['ok']} | {cell['busy']} |")
    first = rows[-1][0] if args.limits else "batched"
    stages = breakdown[(first, 32)]
    per_batch = stages["images"]["count"] / max(stages["forward"]["count"], 1)
    print(f"\nreplica's time per request, {first}, 32 clients (GET /stats): read {stages['read']['mean_ms']:.1f} ms, "
          f"decode {stages['decode']['mean_ms']:.1f} ms, queue {stages['queue']['mean_ms']:.1f} ms, forward "
          f"{stages['forward']['mean_ms']:.1f} ms a batch of {per_batch:.1f} ({stages['forward']['mean_ms'] / per_batch:.1f}"
          f" ms an image), whole route {stages['request']['mean_ms']:.1f} ms")
    at_32 = {label: cell["rps"] for label, _, clients, cell in rows if clients == 32}
    if args.limits:
        print(f"limits on / off throughput at 32 clients: {at_32['limits on'] / at_32['limits off']:.2f}x")
        return
    at_1 = {label: cell["rps"] for label, _, clients, cell in rows if clients == 1}
    print(f"served batched at 32 clients / bare forward: {at_32['batched'] / bare:.2f} (target >= 0.7)")
    print(f"unbatched 32 clients / 1 client: {at_32['unbatched'] / at_1['unbatched']:.2f} (target >= 1.0)")
    print(f"batched / unbatched throughput at 32 clients: {at_32['batched'] / at_32['unbatched']:.2f}x")


if __name__ == "__main__":
    main()

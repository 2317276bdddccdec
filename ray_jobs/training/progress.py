"""Training progress from rank 0 to the driver, so each epoch line is printed once, by the driver.

Ray forwards a worker's stdout to the driver's terminal but not into a Prefect flow run's logs,
and a Prefect flow cannot update its progress artifact from a worker. So rank 0 puts one
`Progress` per epoch (and per notice such as "resumed") on a queue that the driver drains in a
thread, handing each to a callback: print by default, or log it and move a progress artifact.
Ray workers get a Ray queue (an actor, reachable from any node); in-process runs a plain one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

POLL_S = 0.2
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


@dataclass(frozen=True)
class Progress:
    """One line for the user; `epoch` is set on epoch ends, None on notices."""

    line: str
    epoch: int | None = None
    epochs: int | None = None

    @property
    def fraction(self) -> float | None:
        return None if self.epoch is None or not self.epochs else self.epoch / self.epochs


def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def epoch_line(metrics: dict[str, Any], epochs: int, seconds_left: float | None) -> str:
    """What the user reads after each epoch: losses, val top-1, speed and the time left."""
    line = (
        f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"ce {metrics['train_ce_loss']:.4f}  center {metrics['train_center_loss']:.4f}  "
        f"val_acc1 {metrics['val_acc1']:.3f}  val_acc5 {metrics['val_acc5']:.3f}  "
        f"compactness {metrics['val_compactness']:.3f}  {metrics['train_images_per_s']:.1f} img/s  "
        f"lr {metrics['lr']:.2e}"
    )
    return line if seconds_left is None else f"{line}  {format_duration(seconds_left)} left"


def epoch_progress(metrics: dict[str, Any], epochs: int, seconds_left: float | None) -> Progress:
    return Progress(epoch_line(metrics, epochs, seconds_left), int(metrics["epoch"]), epochs)


class HasLine(Protocol):
    line: str


def print_progress(progress: HasLine) -> None:
    print(progress.line, flush=True)


def _new_queue(local: bool) -> Any:
    """A queue rank 0 can reach: in-process, or a Ray actor on the head node. A worker node may go
    away mid-run (elastic training restarts without it), and so may the node a driver attached to
    when several share its address; the head holds the cluster's control store, so it outlives both."""
    if local:
        return queue.Queue()
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})


@contextmanager
def progress_relay(on_progress: Callable[[Progress], None], *, local: bool) -> Iterator[Any]:
    """Yield a queue for rank 0's `Progress`; a driver thread hands each to `on_progress` in order.

    Everything put before the block ends is delivered before it returns. A failing callback costs
    its line, never the run.
    """
    sink = _new_queue(local)
    stop = threading.Event()

    def deliver(progress: Progress) -> None:
        try:
            on_progress(progress)
        except Exception as err:  # noqa: BLE001 - progress is for the user; training goes on
            print(f"progress: could not report {progress.line!r}: {err}", flush=True)

    def drain() -> None:
        while not stop.is_set():
            try:
                deliver(sink.get(timeout=POLL_S))
            except queue.Empty:  # ray.util.queue.Empty is a subclass
                continue
            except Exception:  # noqa: BLE001 - the queue is gone (Ray shut down): nothing more to relay
                return

    thread = threading.Thread(target=drain, name="train-food-progress", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join()
        while True:
            try:
                deliver(sink.get_nowait())
            except Exception:  # noqa: BLE001 - queue.Empty (all delivered), or the queue is gone
                break
        if not local:
            import ray

            ray.kill(sink.actor)

"""Decode files in supervised worker processes: a file that crashes or hangs its decoder is
quarantined as such and the run goes on; running out of memory or spool disk fails the run.

Why not `ProcessPoolExecutor.map`: when one worker dies (a decoder segfault, `os._exit`, the OOM
killer) the whole pool breaks, every queued file fails with `BrokenProcessPool`, and nothing says
which file did it; a decoder that never returns hangs the map forever. Here each worker writes
the index of the job it starts into a shared slot (synchronously: a queue's feeder thread would
die with the process before sending), and sends each result through a locked pipe, also
synchronously. So the parent knows which file was in a worker that died or overran `timeout_s`;
that worker is replaced and the others keep going.

A `MemoryError` or a full disk (`ENOSPC`) in a worker is not a property of the file: it comes
back as `ResourceExhausted`, which fails the run in one line instead of quarantining the file
(and then caching that loss in the dataset's fingerprint).

Jobs go out in small chunks (a queue round trip per file cost about 0.04 ms of a worker's 0.7 ms
on food101_mini10); the slot still names the file a worker is on, and the files of a chunk it did
not finish go back to the queue when it dies.

Workers are spawned (a fresh interpreter that imports only `tasks.ingest.decode`), as before.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.ingest.decode import Inspected

Job = tuple[int, str]
POLL_S = 0.2
BATCH_S = 0.01  # the parent's CPU is the workers' CPU on a small machine
MAX_CHUNK = 16  # files per hand-out; fewer when there are few files, so every worker gets some
DEATHS_WITHOUT_A_FILE = 3  # per worker, in a row, before the run stops


class ResourceExhausted(RuntimeError):
    """The machine, not the file, ran out of something (memory, spool disk)."""


class WorkersKeepDying(RuntimeError):
    """Decode workers die before they take a file, again and again: nothing to blame on a file (a
    broken environment, or code changed under a running ingest), so the run stops instead of
    respawning them forever."""


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process (spawn context)
    slot: Any  # multiprocessing.Value("q"): index of the job it is on, -1 when idle
    seen: tuple[int, float] = (-1, 0.0)  # (job index, when the parent first saw it there)


def _work(fn: Callable[[Job], Inspected], jobs: Any, send: Any, lock: Any, slot: Any, parent: int) -> None:
    """Worker loop: mark the job in `slot`, run it, send the result; None ends the loop, and so does
    the parent's death (a SIGKILLed ingest leaves no worker behind)."""

    def reply(message: tuple[Any, ...]) -> None:
        with lock:
            send.send(message)

    while os.getppid() == parent:
        try:
            chunk = jobs.get(timeout=1.0)
        except queue.Empty:
            continue
        if chunk is None:
            return
        for job in chunk:
            slot.value = job[0]
            try:
                reply(("done", job, fn(job)))
            except MemoryError:
                reply(("exhausted", job, "out of memory"))
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                reply(("exhausted", job, f"no space left for the decode spool ({err.filename or err})"))
        slot.value = -1


def supervised_map(fn: Callable[[Job], Inspected], jobs: list[Job], workers: int,
                   timeout_s: float) -> Iterator[tuple[Job, Inspected]]:
    """Yield `(job, fn(job))` for every job, in completion order, from `workers` processes.

    A job whose worker dies gives `Inspected(error="decoder crashed ...")`, one that runs over
    `timeout_s` `Inspected(error="decoder timed out ...")`; the worker is replaced. Raises
    `ResourceExhausted` (the run, not the file, is the problem).
    """
    context = multiprocessing.get_context("spawn")
    job_queue = context.Queue()
    receive, send = context.Pipe(duplex=False)
    lock = context.Lock()
    by_index = {job[0]: job for job in jobs}
    size = max(1, min(MAX_CHUNK, len(jobs) // (8 * max(1, workers))))
    chunks = [jobs[start:start + size] for start in range(0, len(jobs), size)]
    chunk_of = {job[0]: chunk for chunk in chunks for job in chunk}
    for chunk in chunks:
        job_queue.put(chunk)

    def spawn() -> _Worker:
        slot = context.Value("q", -1, lock=False)
        process = context.Process(target=_work, args=(fn, job_queue, send, lock, slot, os.getpid()), daemon=True)
        process.start()
        return _Worker(process, slot)

    pool = [spawn() for _ in range(max(1, min(workers, len(jobs))))]
    done: dict[int, Inspected] = {}
    quiet_since = time.monotonic()
    deaths_without_a_file = 0

    def received(wait_s: float) -> list[tuple[Job, Inspected]]:
        out = []
        while receive.poll(wait_s):
            kind, job, payload = receive.recv()
            wait_s = 0
            if kind == "exhausted":
                raise ResourceExhausted(f"{job[1]}: {payload}")
            if job[0] not in done:
                done[job[0]] = payload
                out.append((job, payload))
        return out

    try:
        while len(done) < len(jobs):
            arrived = received(POLL_S)
            yield from arrived
            now = time.monotonic()
            if arrived:
                quiet_since, deaths_without_a_file = now, 0
                time.sleep(BATCH_S)  # let results gather: one wake-up per batch, not per file
            for position, worker in enumerate(pool):
                index = worker.slot.value
                if worker.seen[0] != index:
                    worker.seen = (index, now)
                alive = worker.process.is_alive()
                if alive and (index < 0 or now - worker.seen[1] <= timeout_s):
                    continue
                if not alive:
                    yield from received(0)  # what it sent before dying counts
                    deaths_without_a_file = deaths_without_a_file + 1 if index < 0 else 0
                    if deaths_without_a_file >= DEATHS_WITHOUT_A_FILE * len(pool):
                        raise WorkersKeepDying(f"{deaths_without_a_file} decode workers in a row "
                                               f"{_what_happened(worker, alive, timeout_s)} before taking a file")
                worker.process.kill()
                worker.process.join()
                pool[position] = spawn()
                if index >= 0 and index not in done:
                    done[index] = Inspected(error=f"decoder {_what_happened(worker, alive, timeout_s)}")
                    yield by_index[index], done[index]
                if index >= 0:  # the rest of its chunk: nobody else will take those files
                    rest = [job for job in chunk_of[index] if job[0] not in done]
                    if rest:
                        job_queue.put(rest)
                quiet_since = now
            if now - quiet_since > timeout_s + 5 and all(w.slot.value < 0 for w in pool) and job_queue.empty():
                for index, job in by_index.items():  # taken by a worker that died before marking it
                    if index not in done:
                        job_queue.put([job])
                quiet_since = now
    finally:
        for _ in pool:
            job_queue.put(None)
        for worker in pool:
            worker.process.join(timeout=1.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        job_queue.cancel_join_thread()


def _what_happened(worker: _Worker, alive: bool, timeout_s: float) -> str:
    """'timed out (over 3 s)' or 'crashed (exit code 3)' / 'crashed (killed by signal 9)'."""
    if alive:
        return f"timed out (over {timeout_s:g} s)"
    code = worker.process.exitcode
    return f"crashed ({f'killed by signal {-code}' if code is not None and code < 0 else f'exit code {code}'})"

"""A decoder for ingestion's worker processes that misbehaves on files named for it (tests only).

Spawned workers import it by name (the parent's sys.path travels with them), so the pipeline can be
handed `decode` in place of `tasks.ingest.decode.inspect_image`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tasks.ingest.decode import Inspected, inspect_image


def decode(job: tuple[int, str], **options: object) -> Inspected:
    name = Path(job[1]).name
    if name.startswith("crash"):
        os._exit(3)  # what a segfaulting C decoder looks like from outside
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("oom"):
        raise MemoryError
    if name.startswith("nospace"):
        raise OSError(28, "No space left on device", "/spool/0.png")
    return inspect_image(job, **options)


def rewrite_then_decode(job: tuple[int, str], **options: object) -> Inspected:
    """Appends to the file named by $TRAIN_FOOD_TEST_VICTIM (once) before decoding: a source that changes
    after it was fingerprinted."""
    victim = Path(os.environ["TRAIN_FOOD_TEST_VICTIM"])
    if not victim.read_bytes().endswith(b"changed"):
        victim.write_bytes(victim.read_bytes() + b"changed")
    return inspect_image(job, **options)


def counting_decode(job: tuple[int, str], **options: object) -> Inspected:
    """Appends each path it reads to the file named by $TRAIN_FOOD_TEST_READS, then decodes as usual."""
    with open(os.environ["TRAIN_FOOD_TEST_READS"], "a") as log:
        log.write(job[1] + "\n")
    return inspect_image(job, **options)

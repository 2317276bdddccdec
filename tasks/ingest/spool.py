"""The decode spool: where the bytes to store wait between the one read of each file and the shards.

A temporary folder named by the ingest's pid, so a later run can sweep what a killed one left
(`sweep_spools`), holding one append-only file per decode worker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


SPOOL_PREFIX = "train-food-ingest-"


class Spool:
    """A temporary folder of append-only files, one per decode worker (`tasks.ingest.decode`), holding
    the bytes to store; read back by (file, offset, length) while the shards are written."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.readers: dict[str, int] = {}

    def read(self, path: str, offset: int, length: int) -> bytes:
        if path not in self.readers:
            self.readers[path] = os.open(path, os.O_RDONLY)
        return os.pread(self.readers[path], length, offset)

    def close(self) -> None:
        for descriptor in self.readers.values():
            os.close(descriptor)
        self.readers.clear()


@contextmanager
def spool_of_this_run() -> Iterator[Spool]:
    """The decode spool of this process, removed afterwards (swept by a later run if this one is killed)."""
    sweep_spools()
    with tempfile.TemporaryDirectory(prefix=f"{SPOOL_PREFIX}{os.getpid()}-") as folder:
        spooled = Spool(folder)
        try:
            yield spooled
        finally:
            spooled.close()


def sweep_spools() -> list[str]:
    """Delete the spools of ingest processes that no longer exist (SIGKILLed ones); returns them."""
    swept = []
    for path in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*-*"):
        pid = path.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(str(path))
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

"""Reading source files safely: regular files only, never through a link, never past a size limit.

Users point ingestion at folders they scraped, synced or unzipped. Opening with O_NOFOLLOW and
O_NONBLOCK and then checking `fstat` means a link swapped in after the scan is not followed, a FIFO
never blocks the reader, and a file is never read past `max_bytes` (a stray video costs a stat,
not a worker's memory).

Standard library only: ingestion's decode workers import it.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class FileTooLarge(Exception):
    """The file holds more than the allowed bytes; it was not read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size:,} bytes, over the limit of {limit:,}")
        self.size, self.limit = size, limit


def _open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    fd = os.open(path, _OPEN_FLAGS)
    stream = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        stream.close()
        raise OSError(errno.EINVAL, "not a regular file")
    return stream


def read_regular(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file; `FileTooLarge` (nothing read) above `max_bytes`, `OSError` otherwise."""
    with _open_regular(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > max_bytes:
            raise FileTooLarge(size, max_bytes)
        # Ask for the size fstat gave, plus one byte to notice a file that grew since: asking for
        # max_bytes would allocate (then shrink) a buffer of max_bytes for every file.
        data = stream.read(size + 1)
        if len(data) > size:
            data += stream.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise FileTooLarge(len(data), max_bytes)
    return data


def is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """`name` with bytes that are not UTF-8 shown as `\\xNN`: safe in JSON, Parquet, logs and terminals."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")

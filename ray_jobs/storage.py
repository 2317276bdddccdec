"""Where runs, checkpoints and datasets live: a local path (shared by every node) or a pyarrow.fs URI.

A URI may carry file-system options as a query, e.g.
`s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http` for an S3-compatible server, so a
path is joined to a URI *before* its query. Credentials come from the usual environment variables
(AWS_ACCESS_KEY_ID, ...), which every Ray node needs too.
"""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ray_jobs.errors import UserInputError


def is_uri(path: str) -> bool:
    """A pyarrow.fs URI (`s3://bucket/...`, `file:///...`) rather than a local path: the one test for it."""
    return "://" in path


def absolute(path: str | None) -> str | None:
    """An absolute local path (resolved against this process's cwd), or a URI (`s3://...`) unchanged."""
    if path is None or is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of a URI (`s3://...`) or of a local path."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), uri


def join(base: str, *parts: str) -> str:
    """`base/part/...`, keeping a URI's `?query` (its file-system options) at the end."""
    location, query = base.split("?", 1) if is_uri(base) and "?" in base else (base, "")
    joined = posixpath.join(location.rstrip("/"), *parts)
    return f"{joined}?{query}" if query else joined


def local_checkpoint(path: str, cache: Path) -> Path:
    """A local path to a checkpoint (directory or file): `path` itself, or for a URI a copy in `cache`.

    The copy is downloaded into a temporary sibling and renamed, so an interrupted download is
    never mistaken for a checkpoint; a second call reuses it.
    """
    if not is_uri(path):
        return Path(path).resolve()
    fs, remote = filesystem(path)
    info = fs.get_file_info(remote)
    if info.type == pafs.FileType.NotFound:
        raise UserInputError(f"no checkpoint at {path}")
    target = cache / posixpath.basename(remote.rstrip("/"))
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".download-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        destination = partial if info.type == pafs.FileType.Directory else partial / target.name
        pafs.copy_files(remote, str(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        destination.rename(target)
        if partial.exists():
            partial.rmdir()
    return target

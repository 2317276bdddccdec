"""A build's fingerprint: what makes two ingests of a source the same dataset.

sha256 over every file's relative path and the sha256 of its bytes (not its size or mtime, which
can stay the same when the bytes change), every folder (an empty class folder counts), the
options and `ingest_code_version()`. Files quarantined from their listing alone are fingerprinted
by their path and problem: their bytes never reach the dataset. Equal fingerprints mean equal
datasets, so the flow names the dataset folder by it. The hashes are taken by the decode workers
from the one read of each file that also gives the decoded image and the stored bytes.

The code version is an explicit number, not a hash of the source files: moving or tidying the
ingest code must not make every dataset (and every champion scored on one) a new build. Bump
`INGEST_OUTPUT_VERSION` when a change stores other bytes, rows or splits for the same photos.
Champions are compared by their test split's content (`ray_jobs.dataset_format.rows_digest`),
which no code version enters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from PIL import __version__ as PILLOW_VERSION

from ray_jobs.dataset_format import SCHEMA_VERSION

INGEST_OUTPUT_VERSION = 3  # 1: the hash of the tasks/ingest*.py sources, before the files moved; 2: until JPEGs
# with an EXIF orientation outside 2-8 were stored as they are and duplicates were found by picture


def ingest_code_version() -> str:
    """sha256 naming what ingestion stores: the output version, the dataset schema and Pillow (it re-encodes)."""
    return hashlib.sha256(f"ingest output {INGEST_OUTPUT_VERSION}; schema {SCHEMA_VERSION}; "
                          f"pillow {PILLOW_VERSION}".encode()).hexdigest()


UNREADABLE = ""  # the digest recorded for a file that cannot be read (no permission, vanished)


def listing_digest(problem: str) -> str:
    """What stands in for the bytes of an entry quarantined from its listing alone (never read)."""
    return f"not read: {problem}"


def fingerprint(digests: Mapping[str, str], dirs: tuple[str, ...] | list[str], options: Mapping[str, object],
                code_version: str) -> str:
    """sha256 over every file's path and content hash, every folder, the options and the code version.

    Two sources with the same fingerprint give byte-identical datasets (bar the creation time).
    """
    digest = hashlib.sha256()
    header = {"code_version": code_version, "options": dict(options)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for rel_path in sorted(dirs):
        digest.update(_encode(f"\nD\0{rel_path}"))
    for rel_path in sorted(digests):
        digest.update(_encode(f"\nF\0{rel_path}\0{digests[rel_path] or 'unreadable'}"))
    return digest.hexdigest()


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # file names as the OS gave them, byte for byte


def short_fingerprint(fingerprint: str | None) -> str:
    """The first 16 hex digits: enough to tell builds apart in a folder name or a message."""
    return (fingerprint or "none")[:16]

"""Know a build again without reading its source: each dataset keeps the stamp and hash of every file.

Ingestion reads each file once, in its decode worker, and hashes what it read; the fingerprint comes
from those hashes, so it is only known after the read. A rerun on an unchanged source should not
read 2,000 photos to learn that, so a dataset records, next to its manifest, each file's stamp (size,
mtime, ctime, inode: what `lstat` gives without reading) and the sha256 of the bytes it read. When
every listed entry has the recorded stamp, its bytes are the ones hashed then (any write moves ctime,
which no user can set back), the fingerprint follows from the recorded hashes, and the build is
recognised with no read. Any difference (a file touched, added, removed, an option) means a full
one-pass ingest, which then finds out whether the build is new.

Not part of the dataset contract: a dataset without this file (older, or copied elsewhere, where the
inodes differ) is simply read again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import pyarrow.fs as pafs

from tasks.ingest.config import FINGERPRINT_FIELD
from tasks.ingest.fingerprint import fingerprint, short_fingerprint
from tasks.ingest.scan import SourceFile, SourceTree

INDEX_FILE = "source_index.json"


def stamp(file: SourceFile) -> list[int]:
    return [file.size, file.mtime_ns, file.ctime_ns, file.inode]


def index_document(tree: SourceTree, digests: Mapping[str, str], options: Mapping[str, Any],
                   code_version: str) -> bytes:
    """What `write` stores: the listing's stamps and the hashes the build was fingerprinted from."""
    return json.dumps({
        "options": dict(options),
        "code_version": code_version,
        "dirs": list(tree.dirs),
        "files": {file.rel_path: [*stamp(file), digests[file.rel_path]] for file in tree.files},
    }, ensure_ascii=False).encode("utf-8", "surrogateescape")


def write(fs: pafs.FileSystem, root: str, document: bytes) -> None:
    with fs.open_output_stream(f"{root}/{INDEX_FILE}") as stream:
        stream.write(document)


def recorded_fingerprint(fs: pafs.FileSystem, dataset: str, tree: SourceTree, options: Mapping[str, Any],
                         code_version: str) -> str | None:
    """The fingerprint of the build `tree` would make, if the dataset at `dataset` recorded every
    entry of it with the same stamp (and the same options and code version); else None."""
    try:
        with fs.open_input_stream(f"{dataset}/{INDEX_FILE}") as stream:
            index = json.loads(stream.read().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):  # absent, unreadable, or not ours
        return None
    recorded = index.get("files") if isinstance(index, dict) else None
    if (not isinstance(recorded, dict) or index.get("options") != dict(options)
            or index.get("code_version") != code_version or index.get("dirs") != list(tree.dirs)
            or len(recorded) != len(tree.files)):
        return None
    digests = {}
    for file in tree.files:
        entry = recorded.get(file.rel_path)
        if not isinstance(entry, list) or len(entry) != 5 or entry[:4] != stamp(file):
            return None
        digests[file.rel_path] = str(entry[4])
    return fingerprint(digests, tree.dirs, options, code_version)


def named(out: str, source_hash: str) -> str:
    """DIR with `{fingerprint}` (the flow's content-addressed folders) replaced by the build's short one."""
    return out.replace(FINGERPRINT_FIELD, short_fingerprint(source_hash))


def known_build(fs: pafs.FileSystem, template: str, tree: SourceTree, options: Mapping[str, Any],
                code_version: str) -> str | None:
    """The fingerprint of an existing dataset at DIR (or, for a `{fingerprint}` DIR, at any folder it can
    name) whose source index matches the listing stamp for stamp: that build, known without a read."""
    candidates = [template]
    if FINGERPRINT_FIELD in template:
        parent, pattern = os.path.split(template)
        selector = pafs.FileSelector(parent, allow_not_found=True)
        prefix, suffix = pattern.split(FINGERPRINT_FIELD, 1)
        candidates = [info.path for info in fs.get_file_info(selector)
                      if info.base_name.startswith(prefix) and info.base_name.endswith(suffix)]
    for candidate in candidates:
        known = recorded_fingerprint(fs, candidate, tree, options, code_version)
        if known is not None and named(template, known) == candidate:
            return known
    return None

"""List an ImageFolder source: its layout, its classes and one record per entry; fingerprint it.

Listing only stats (no decoding, no reading). Every entry under SRC that is not a folder ingest
walks into becomes a `SourceFile` ("files seen"), including those that can never be ingested:
those carry a `problem` and go straight to the quarantine list, so that nothing silently vanishes.

The walk is safe on trees a user scraped, synced or unzipped:
- symbolic links are never followed, to files or folders: a link loop cannot make the listing
  endless, a link cannot pull in files from outside SRC, and a folder link cannot relabel a class
  with another class's images. Each link is one quarantined entry that names its target;
- FIFOs, sockets and devices are quarantined unread (reading a FIFO would block forever);
- files larger than the size limit are quarantined from their size alone;
- names that are not UTF-8 are quarantined (a label and a manifest entry must be text), shown
  with `\\xNN` escapes;
- a folder holding a train-food dataset, or a temporary folder of an interrupted ingest, is an
  ingest output, not photos: it is skipped whole and reported, so an output folder inside SRC
  never becomes a class and never changes the fingerprint.

The fingerprint identifies a build: it hashes every file's bytes (not its size or mtime, which
can stay the same when the bytes change), every folder (an empty class folder counts), the
options and the ingest code version. Files quarantined from their listing alone are fingerprinted
by their path and problem: their bytes never reach the dataset.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ray_jobs.errors import UserInputError
from tasks.ingest.files import is_utf8, printable
from tasks.ingest.store import output_folder_reason

SPLITS = ("train", "val", "test")
# Split folder names users commonly use, mapped to the canonical split.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

Layout = Literal["flat", "presplit"]
EntryKind = Literal["file", "link", "special", "unreadable folder"]


@dataclass(frozen=True)
class SourceFile:
    """One entry under SRC, as listed (not yet decoded)."""

    rel_path: str  # POSIX path relative to SRC, as the OS gives it (bytes that are not UTF-8 as surrogates)
    size: int
    mtime_ns: int
    kind: EntryKind = "file"
    ctime_ns: int = 0  # with size, mtime and inode: the stamp a rerun compares (`source_index`)
    inode: int = 0
    class_name: str | None = None
    source_split: str | None = None  # canonical split of a pre-split source, None for a flat one
    problem: str | None = None  # why the entry cannot be ingested, decided from its listing alone


@dataclass(frozen=True)
class SourceTree:
    """What `scan_source` found: the layout, sorted classes, every entry and folder sorted by path."""

    root: Path
    layout: Layout
    split_dirs: dict[str, str]  # canonical split -> folder name in SRC ("val" -> "valid")
    classes: tuple[str, ...]
    files: tuple[SourceFile, ...]
    dirs: tuple[str, ...]  # every folder walked into, relative to SRC
    skipped_folders: tuple[dict[str, str], ...]  # ingest outputs inside SRC: {"path", "reason"}


def check_source_dir(src: str | os.PathLike[str]) -> Path:
    """Return SRC as an absolute path, or raise `UserInputError` if it is missing, unreadable or empty."""
    root = Path(src).expanduser().absolute()
    if not root.exists():
        raise UserInputError(f"source folder {printable(str(root))} does not exist")
    if not root.is_dir():
        raise UserInputError(f"source {printable(str(root))} is not a folder")
    try:
        empty = not any(root.iterdir())
    except OSError as err:
        raise UserInputError(f"cannot read source folder {printable(str(root))}: {err.strerror or err}") from None
    if empty:
        raise UserInputError(f"source folder {printable(str(root))} is empty")
    return root


@dataclass(frozen=True)
class _Walk:
    entries: list[SourceFile]
    dirs: list[str]
    skipped_folders: list[dict[str, str]]


def _walk(root: Path) -> _Walk:
    """List every entry under root without following links, pruning ingest outputs."""
    entries, dirs, skipped = [], [], []

    def unreadable(err: OSError) -> None:
        rel = Path(err.filename).relative_to(root).as_posix()
        entries.append(SourceFile(rel, -1, 0, "unreadable folder", problem=f"unreadable folder: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # followlinks=False
        here = Path(dirpath)
        walked = []
        for name in dirnames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():  # os.walk lists a link to a folder as a folder; never enter it
                entries.append(_entry(root, path))
            elif reason := output_folder_reason(path):
                skipped.append({"path": printable(rel), "reason": reason})
            else:
                walked.append(name)
                dirs.append(rel)
        dirnames[:] = walked
        entries.extend(_entry(root, here / name) for name in filenames)
    return _Walk(sorted(entries, key=lambda e: e.rel_path), sorted(dirs),
                 sorted(skipped, key=lambda s: s["path"]))


def _entry(root: Path, path: Path) -> SourceFile:
    """One listed entry: a regular file, a link (with its target) or something else, from lstat alone."""
    rel = path.relative_to(root).as_posix()
    try:
        st = path.lstat()
    except OSError as err:  # vanished while listing
        return SourceFile(rel, -1, 0, "special", problem=f"unreadable: {err.strerror or err}")
    if stat.S_ISLNK(st.st_mode):
        target = printable(os.readlink(path))
        return SourceFile(rel, st.st_size, st.st_mtime_ns, "link",
                          problem=f"symbolic link to {target!r}, not followed (only regular files inside SRC "
                                  "are ingested)")
    if not stat.S_ISREG(st.st_mode):
        return SourceFile(rel, st.st_size, st.st_mtime_ns, "special",
                          problem=f"not a regular file ({_special_kind(st.st_mode)}), not read")
    return SourceFile(rel, st.st_size, st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "unknown type"


def scan_source(src: str | os.PathLike[str], max_file_bytes: int) -> SourceTree:
    """Detect the layout and classes of SRC and classify every entry (files over `max_file_bytes`
    are quarantined unread)."""
    root = check_source_dir(src)
    walk = _walk(root)
    layout, split_dirs = _detect_layout(root, walk.dirs)
    classes = _find_classes(root, walk.dirs, split_dirs)
    folder_to_split = {folder: split for split, folder in split_dirs.items()}
    files = tuple(_classify(entry, layout, folder_to_split, max_file_bytes) for entry in walk.entries)
    return SourceTree(root, layout, split_dirs, classes, files, tuple(walk.dirs), tuple(walk.skipped_folders))


def _visible_dirs(dirs: list[str], parent: str | None = None) -> list[str]:
    """Names of the non-hidden folders directly inside `parent` (SRC itself when None)."""
    prefix = f"{parent}/" if parent else ""
    names = [d[len(prefix):] for d in dirs if d.startswith(prefix)]
    return sorted(name for name in names if "/" not in name and not name.startswith("."))


def _detect_layout(root: Path, dirs: list[str]) -> tuple[Layout, dict[str, str]]:
    """`presplit` when every top-level folder is a split name (train/val/valid/validation/test)."""
    top = _visible_dirs(dirs)
    shown = printable(str(root))
    if not top:
        raise UserInputError(f"source folder {shown} has no class folders (expected SRC/<class>/<image>)")
    split_named = [name for name in top if name.lower() in SPLIT_ALIASES]
    if not split_named:
        return "flat", {}
    if len(split_named) != len(top):
        others = sorted(printable(name) for name in set(top) - set(split_named))
        raise UserInputError(
            f"source folder {shown} mixes split folders {split_named} with other folders {others}; "
            "use either SRC/<class>/<image> or SRC/<split>/<class>/<image>"
        )
    split_dirs: dict[str, str] = {}
    for name in split_named:
        split = SPLIT_ALIASES[name.lower()]
        if split in split_dirs:
            raise UserInputError(f"source folder {shown} has two folders for split {split!r}: "
                                 f"{split_dirs[split]}/ and {name}/")
        split_dirs[split] = name
    if "train" not in split_dirs:
        raise UserInputError(f"source folder {shown} is split ({', '.join(top)}) but has no train/ folder")
    return "presplit", split_dirs


def _find_classes(root: Path, dirs: list[str], split_dirs: dict[str, str]) -> tuple[str, ...]:
    """Class names are folder names (UTF-8 only: they become labels): top-level for a flat source,
    the union across splits otherwise."""
    if not split_dirs:
        found = set(_visible_dirs(dirs))
    else:
        found = set()
        for folder in split_dirs.values():
            found.update(_visible_dirs(dirs, folder))
        if not found:
            raise UserInputError(f"source folder {printable(str(root))} has no class folders inside its split "
                                 "folders (expected SRC/<split>/<class>/<image>)")
    classes = {name for name in found if is_utf8(name)}
    if len(classes) < 2:
        not_text = sorted(printable(name) for name in found - classes)
        note = f"; folder names that are not UTF-8 are not classes: {', '.join(not_text)}" if not_text else ""
        count = "only one class folder" if classes else "no class folders"
        raise UserInputError(f"source folder {printable(str(root))} has {count} ({', '.join(sorted(classes))}); "
                             f"a classifier needs at least two{note}")
    return tuple(sorted(classes))


def _classify(entry: SourceFile, layout: Layout, folder_to_split: dict[str, str],
              max_file_bytes: int) -> SourceFile:
    """Attach class and split to a listed entry, or the reason it cannot be ingested."""
    if entry.problem:
        return entry
    parts = entry.rel_path.split("/")
    if not is_utf8(entry.rel_path):
        return replace(entry, problem="name is not valid UTF-8 (shown with \\x escapes); rename it to ingest it")
    if any(part.startswith(".") for part in parts):
        return replace(entry, problem="hidden file (name starts with '.'), not ingested")
    if entry.size > max_file_bytes:
        return replace(entry, problem=f"too large: {entry.size:,} bytes, over the limit of {max_file_bytes:,} "
                                      "(--max-file-bytes); not read")
    if layout == "presplit":
        if parts[0] not in folder_to_split:
            return replace(entry, problem="not inside a split folder")
        split, parts = folder_to_split[parts[0]], parts[1:]
    else:
        split = None
    if len(parts) < 2:
        return replace(entry, problem="not inside a class folder")
    return replace(entry, class_name=parts[0], source_split=split)

"""Decode and validate one image file: the function the ingestion process pool runs.

This module imports only the standard library and Pillow (never prefect, torch or the rest of
`tasks.ingest`), so a freshly spawned worker process starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

REENCODE_QUALITY = 90
# Leading bytes of common image formats: a file that starts like an image but that Pillow cannot
# identify is a corrupt image, not a non-image.
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF")


@dataclass(frozen=True)
class Inspected:
    """What decoding one file found. `error` is set when the file is unusable (then no size)."""

    sha256: str = ""  # of the source file's bytes ("" only when the file could not be read)
    width: int = 0  # of the image as it will be stored
    height: int = 0
    reencoded_path: str | None = None  # spool file holding the re-encoded JPEG (--max-side)
    error: str | None = None


def inspect_image(job: tuple[int, str], max_side: int | None = None, spool_dir: str | None = None) -> Inspected:
    """Read, hash and fully decode `job = (index, path)`; re-encode it when larger than max_side.

    Never raises for a bad file: the reason comes back in `Inspected.error` for the quarantine list.
    """
    index, path = job
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return Inspected(error=f"unreadable: {err.strerror or err}")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Inspected(sha256=digest, error="empty file (0 bytes)")
    try:
        image = _decode(data)
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_MAGIC):
            return Inspected(sha256=digest, error="corrupt image: unreadable header")
        return Inspected(sha256=digest, error="not an image (Pillow cannot identify the format)")
    except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt file
        kind = "truncated" if "truncated" in str(err) else "corrupt"
        return Inspected(sha256=digest, error=f"{kind} image: {type(err).__name__}: {err}")
    if max_side is None or max(image.size) <= max_side:
        return Inspected(sha256=digest, width=image.width, height=image.height)
    small = _shrink(image, max_side)
    spool_path = Path(spool_dir or ".") / f"{index}.jpg"
    small.save(spool_path, format="JPEG", quality=REENCODE_QUALITY)
    return Inspected(sha256=digest, width=small.width, height=small.height, reencoded_path=str(spool_path))


def _decode(data: bytes) -> Image.Image:
    """Decode every pixel (load) and convert to RGB, which is what a trainer will do later
    (an RGB image is returned as is: converting it would only copy it)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Resize so the longest side is max_side, keeping the aspect ratio."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

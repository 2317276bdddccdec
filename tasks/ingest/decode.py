"""Decode and validate one image file, and choose the bytes training will read: the function the
ingestion process pool runs.

A file's bytes are stored as they are when training's decoder (`torchvision.io.decode_image`) sees
in them what Pillow sees (`ray_jobs.data.image_prep.reencode_reason` is None). Otherwise its first frame,
upright, opaque and 8-bit RGB, is re-encoded: as JPEG (quality 90) when the source is a JPEG
(already lossy; PNG would be several times larger) or when `max_side` shrinks it, else as PNG
(lossless: a BMP, TIFF, GIF or 16-bit PNG keeps its content).

This module imports only the standard library, Pillow and Pillow-only helpers (never prefect, torch
or the rest of `tasks.ingest`), so a freshly spawned worker process starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from ray_jobs.data.image_prep import MAX_FILE_BYTES, TooManyPixels, open_image, reencode_reason, upright_rgb
from tasks.ingest.files import FileTooLarge, read_regular

REENCODE_QUALITY = 90
_LOSSY_FORMATS = ("JPEG", "MPO")  # re-encoded as JPEG
# Leading bytes of common image formats: a file that starts like an image but that Pillow cannot
# identify is a corrupt image, not a non-image.
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF", b"II*\0", b"MM\0*")


@dataclass(frozen=True)
class Inspected:
    """What decoding one file found. `error` is set when the file is unusable (then no size)."""

    sha256: str = ""  # of the source file's bytes ("" only when the file could not be read)
    content_sha256: str = ""  # of the bytes that will be stored (the source's when stored as they are)
    picture_sha256: str = ""  # what duplicates are found by: a stored JPEG's hash without its metadata
    width: int = 0  # of the image as it will be stored
    height: int = 0
    stored_at: tuple[str, int, int] | None = None  # (spool file, offset, length) of the bytes to store
    reencode_reason: str | None = None  # why it was re-encoded ("format BMP", "EXIF orientation", ...)
    error: str | None = None


def inspect_image(job: tuple[int, str], max_side: int | None = None, spool_dir: str | None = None,
                  max_file_bytes: int = MAX_FILE_BYTES) -> Inspected:
    """Read `job = (index, path)` once: hash it, decode it (`check_decodes`), and append the bytes to store to this
    worker's spool file in `spool_dir`: its own, or a re-encoding when training could not read it as
    it is or it is larger than max_side. The hash, the decode check and the stored bytes so come
    from one read.

    Never raises for a bad file: the reason comes back in `Inspected.error` for the quarantine list.
    """
    _, path = job
    try:
        data = read_regular(path, max_file_bytes)
    except FileTooLarge as err:
        return Inspected(error=f"too large: {err}")
    except OSError as err:
        return Inspected(error=f"unreadable: {err.strerror or err}")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Inspected(sha256=digest, error="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow warns about odd metadata: the outcome below is what counts
            warnings.simplefilter("ignore")
            image = open_image(data)
            source_format = image.format
            reason = reencode_reason(image, data)
            as_is = reason is None and (max_side is None or max(image.size) <= max_side)
            # Before the check: a JPEG's scaled decode shrinks `size`. Upright, as a file stored as it
            # is has no EXIF rotation.
            width, height = image.size
            if as_is:
                check_decodes(image)
            else:
                pixels = upright_rgb(image)
    except TooManyPixels as err:
        return Inspected(sha256=digest, error=str(err))
    except MemoryError:  # the machine's limit, not the file's fault: the run fails (tasks.ingest.workers)
        raise
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_MAGIC):
            return Inspected(sha256=digest, error="corrupt image: unreadable header")
        return Inspected(sha256=digest, error="not an image (Pillow cannot identify the format)")
    except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt file
        kind = "truncated" if "truncated" in str(err) else "corrupt"
        return Inspected(sha256=digest, error=f"{kind} image: {type(err).__name__}: {err}")
    if as_is:
        picture = jpeg_picture_digest(data) if source_format == "JPEG" else digest
        return Inspected(sha256=digest, content_sha256=digest, picture_sha256=picture, width=width, height=height,
                         stored_at=_spool(data, spool_dir))
    as_jpeg = source_format in _LOSSY_FORMATS
    if max_side is not None and max(pixels.size) > max_side:
        pixels, reason, as_jpeg = _shrink(pixels, max_side), f"longer side over --max-side {max_side}", True
    encoded = _encode(pixels, as_jpeg)
    stored = hashlib.sha256(encoded).hexdigest()
    return Inspected(sha256=digest, content_sha256=stored, picture_sha256=stored, width=pixels.width,
                     height=pixels.height, stored_at=_spool(encoded, spool_dir), reencode_reason=reason)


_METADATA_SEGMENTS = frozenset(range(0xE0, 0xF0)) - {0xEE} | {0xFE}  # APP0-15 but APP14 (Adobe: colour transform); COM


def jpeg_picture_digest(data: bytes) -> str:
    """SHA-256 of a JPEG without its metadata segments (EXIF, ICC, XMP, comments, ...).

    Two files that differ only there are one picture to both decoders (neither applies an ICC
    profile, and a JPEG stored as it is has no EXIF rotation), so they are duplicates: Food-101
    has such pairs, and one in test and one in train would be a leak.
    """
    digest = hashlib.sha256(data[:2])
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan: the picture data, to the end of the file
            break
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker not in _METADATA_SEGMENTS:
            digest.update(data[position:end])
        position = end
    digest.update(data[position:])
    return digest.hexdigest()


def check_decodes(image: Image.Image) -> None:
    """Decode every byte of `image`'s picture data, raising what the decoder raises; the pixels are
    not needed (the file's own bytes are stored).

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling, Pillow's `draft`): the entropy-coded
    data, where truncation and corruption show, is still read and checked in full; only the
    inverse DCT runs on 1 of 64 coefficients, which takes a third off the time of a full decode.
    tests/test_ingest_hostile.py checks that it refuses exactly the damaged JPEGs a full decode refuses.
    """
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


_SPOOL_FILES: dict[str, BinaryIO] = {}  # this process's append-only spool file, by spool folder


def _spool(data: bytes, spool_dir: str | None) -> tuple[str, int, int] | None:
    """Append `data` to this process's own spool file (one per worker: no lock, no file per image, and
    no image through the pipe to the parent); flushed, so the parent can read it once told where."""
    if spool_dir is None:
        return None
    stream = _SPOOL_FILES.get(spool_dir)
    if stream is None:
        stream = _SPOOL_FILES[spool_dir] = open(os.path.join(spool_dir, f"worker-{os.getpid()}.bin"), "ab")  # noqa: SIM115
    offset = stream.tell()
    stream.write(data)
    stream.flush()
    return stream.name, offset, len(data)


def _encode(image: Image.Image, as_jpeg: bool) -> bytes:
    buffer = io.BytesIO()
    if as_jpeg:
        image.save(buffer, format="JPEG", quality=REENCODE_QUALITY)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Resize so the longest side is max_side, keeping the aspect ratio."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

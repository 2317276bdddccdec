"""Image bytes -> one uint8 RGB tensor (C, H, W), or one clear error naming where the bytes came from.

`decode_rgb` is the training decoder: training and evaluation decode stored rows with it.
Ingestion stores only bytes it reads as one 8-bit RGB picture; its first-frame and 8-bit
conversions keep datasets written by older ingest code (which stored animations and 16-bit PNGs as
they came) from breaking a batch. `decode_photo` is for photos that never went through ingestion
(`predict` files, request bodies): it applies ingestion's conversions (`image_prep`) first, so a
photo looks the same to the model in all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from ray_jobs.data.image_prep import (
    MAX_FILE_BYTES,
    TooManyPixels,
    check_pixel_limit,
    open_image,
    reencode_reason,
    upright_rgb,
)
from ray_jobs.errors import UserInputError


def decode_rgb(data: bytes, where: str) -> Tensor:
    """Decode JPEG, PNG, GIF or WebP bytes to uint8 RGB (C, H, W).

    Raises `UserInputError` naming `where` (a file, or a dataset row) when the header promises more
    than `MAX_IMAGE_PIXELS` (checked before decoding) or when torchvision cannot decode the bytes.
    """
    try:
        check_pixel_limit(data)
    except TooManyPixels as err:
        raise UserInputError(f"{where}: {err}") from None
    try:
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{where}: not a readable image for the training decoder ({reason})") from None
    if pixels.ndim == 4:  # an animation: frames first
        pixels = pixels[0]
    if pixels.dtype != torch.uint8:  # a 16-bit PNG
        pixels = to_dtype(pixels, torch.uint8, scale=True)
    return pixels


def read_image(path: str | Path) -> Tensor:
    """Decode a file as uint8 RGB CHW, as training saw the ingested copy of such a file.

    `UserInputError` (one line, naming the file) for a file that is too large, holds too many
    pixels or is not a readable image.
    """
    return decode_photo(_read_limited(Path(path)), str(path))


def decode_photo(data: bytes, where: str) -> Tensor:
    """Decode image bytes as uint8 RGB CHW, the way ingestion stores them and training decodes them.

    Bytes ingestion would store as they are go through the training decoder; any others (BMP,
    TIFF, an animation, a rotated phone photo, transparency, 16-bit) are converted the way
    ingestion converts them. Shared by `predict` (files) and the Serve app (request bodies), so a
    photo looks the same to the model in both. `UserInputError` naming `where` for too many pixels
    or bytes that are not a readable image.
    """
    from PIL import UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        image = open_image(data)
        if reencode_reason(image, data) is None:
            return decode_rgb(data, where)
        return pil_to_tensor(upright_rgb(image))
    except TooManyPixels as err:
        raise UserInputError(f"{where}: {err}") from None
    except UnidentifiedImageError:
        raise UserInputError(f"{where}: not a readable image (unknown format or corrupt header)") from None
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means "not a readable image"
        raise UserInputError(f"{where}: not a readable image ({type(err).__name__}: {err})") from None


def _read_limited(path: Path) -> bytes:
    """The file's bytes, refusing before reading one that is larger than `MAX_FILE_BYTES`."""
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise UserInputError(f"{path}: too large to be a photo ({size:,} bytes, limit {MAX_FILE_BYTES:,})")
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise UserInputError(f"{path}: cannot read file: {err.strerror or err}") from None
    if not data:
        raise UserInputError(f"{path}: empty file")
    return data

"""The training decoder: stored image bytes -> one uint8 RGB tensor (C, H, W), or one clear error.

Training, evaluation and `predict` decode here. Ingestion stores only bytes this decoder reads as
one 8-bit RGB picture; the first-frame and 8-bit conversions below keep datasets written by older
ingest code (which stored animations and 16-bit PNGs as they came) from breaking a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from ray_jobs.errors import UserInputError
from ray_jobs.image_prep import TooManyPixels, check_pixel_limit


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

"""Real image files of every format and quirk ingestion meets in user folders, built in memory.

Each builder returns encoded bytes made by Pillow (or, where Pillow cannot write the variant, a
minimal hand-written PNG), so tests exercise the real decoders on real files.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# Orientation 6: the camera was turned 90 degrees clockwise; viewers rotate the stored pixels back.
EXIF_ROTATED = 6


def picture(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth RGB picture (gradients plus one coloured block) that survives JPEG recognisably."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 128, size=3)
    pixels = np.stack([base[0] + x * 100 // max(width, 1), base[1] + y * 100 // max(height, 1),
                       np.full_like(x, base[2])], axis=-1)
    pixels[: height // 3, : width // 3] = (230, 20, 20)  # a red block in the top-left corner
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (for variants Pillow cannot write, such as 16-bit RGB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\0" + row for row in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A real decompression bomb: a 1-bit PNG of width x height black pixels in a few kilobytes."""
    row = b"\0" + bytes((width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def sixteen_bit_gray(width: int = 64, height: int = 8) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG (a horizontal ramp over the whole 0..65535 range) and its values."""
    values = np.tile(np.linspace(0, 65535, width).astype(np.uint16), (height, 1))
    return encode(Image.fromarray(values), "PNG"), values


def sixteen_bit_rgb(width: int = 32, height: int = 8) -> tuple[bytes, np.ndarray]:
    """A 16-bit-per-channel RGB PNG (three different ramps) and its values (H, W, 3)."""
    ramp = np.linspace(0, 65535, width).astype(np.uint16)
    values = np.stack([np.tile(ramp, (height, 1)), np.tile(ramp[::-1], (height, 1)),
                       np.full((height, width), 30000, np.uint16)], axis=-1)
    rows = [values[y].astype(">u2").tobytes() for y in range(height)]
    return png(width, height, 16, 2, rows), values


def half_transparent(width: int = 32, height: int = 16) -> Image.Image:
    """RGBA: the left half fully transparent (its hidden colour black), the right half opaque blue."""
    pixels = np.zeros((height, width, 4), np.uint8)
    pixels[:, width // 2:] = (20, 40, 220, 255)
    return Image.fromarray(pixels, "RGBA")


def animation(fmt: str, seed: int) -> bytes:
    first, second = picture(seed=seed), picture(seed=seed + 1000).rotate(180)
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)


def jpeg_with_orientation(value: int, seed: int = 0) -> bytes:
    """A 48 x 32 JPEG whose EXIF orientation tag holds `value`: `EXIF_ROTATED` says 'rotate 90 degrees
    clockwise to view' (a phone held upright); 0 is outside the standard's 1-8 (cameras write it, and
    both decoders show such a picture as it is stored)."""
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(picture(seed=seed), "JPEG", quality=95, exif=exif)


def mixed_formats() -> dict[str, bytes]:
    """One file per format and quirk, each with different pixels (so none is a duplicate)."""
    p = picture
    gray16, _ = sixteen_bit_gray()
    rgb16, _ = sixteen_bit_rgb()
    return {
        "jpeg.jpg": encode(p(seed=1), "JPEG"),
        "jpeg_gray.jpg": encode(p(seed=2).convert("L"), "JPEG"),
        "jpeg_cmyk.jpg": encode(p(seed=3).convert("CMYK"), "JPEG"),
        "jpeg_rotated.jpg": jpeg_with_orientation(EXIF_ROTATED, seed=4),
        "jpeg_orientation_0.jpg": jpeg_with_orientation(0, seed=22),
        "png_rgb.png": encode(p(seed=5), "PNG"),
        "png_gray.png": encode(p(seed=6).convert("L"), "PNG"),
        "png_palette.png": encode(p(seed=7).convert("P"), "PNG"),
        "png_rgba.png": encode(half_transparent(), "PNG"),
        "png_la.png": encode(p(seed=8).convert("LA"), "PNG"),
        "png_gray_colour_key.png": encode(p(seed=9).convert("L"), "PNG", transparency=0),
        "png_16bit_gray.png": gray16,
        "png_16bit_rgb.png": rgb16,
        "png_1bit.png": encode(p(seed=10).convert("1"), "PNG"),
        "gif.gif": encode(p(seed=11), "GIF"),
        "gif_animated.gif": animation("GIF", seed=12),
        "gif_transparent.gif": encode(half_transparent(width=30).convert("P"), "GIF", transparency=0),
        "webp.webp": encode(p(seed=13), "WEBP", quality=90),
        "webp_alpha.webp": encode(half_transparent(width=34), "WEBP", lossless=True),
        "webp_animated.webp": animation("WEBP", seed=14),
        "bmp.bmp": encode(p(seed=15), "BMP"),
        "tiff.tiff": encode(p(seed=16), "TIFF"),
        "tiff_cmyk.tif": encode(p(seed=17).convert("CMYK"), "TIFF"),
        "tiff_16bit.tif": encode(Image.fromarray(np.tile(np.arange(0, 65535, 1024, np.uint16), (4, 1))), "TIFF"),
        "ppm.ppm": encode(p(seed=18), "PPM"),
        "tga.tga": encode(p(seed=19), "TGA"),
        "mpo.mpo": encode(p(seed=20), "MPO", save_all=True, append_images=[p(seed=21)]),
    }


# Files whose bytes training's decoder reads as Pillow does: ingestion stores them unchanged.
STORED_AS_IS = {"jpeg.jpg", "jpeg_gray.jpg", "jpeg_orientation_0.jpg", "png_rgb.png", "png_gray.png", "webp.webp"}

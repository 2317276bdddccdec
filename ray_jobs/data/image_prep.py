"""What an image must be before a model sees it, decided with Pillow alone.

Training decodes stored bytes with `torchvision.io.decode_image`, which reads JPEG, PNG, GIF and
WebP only, ignores EXIF orientation, drops alpha, returns uint16 for 16-bit PNGs and a 4-D tensor
for animations. So ingestion keeps a file's bytes only when that decoder sees the picture Pillow
sees (`reencode_reason` is None) and otherwise stores `upright_rgb(image)`: the first frame, EXIF
orientation applied, transparency composited on white, 16-bit scaled to 8 bits, RGB. `predict`
applies the same rules to its inputs, so a photo looks the same to the model in both.

Every decoder refuses an image whose header promises more than `MAX_IMAGE_PIXELS`, a side longer
than `MAX_IMAGE_SIDE` or a shape more elongated than `MAX_ASPECT_RATIO` before decoding a pixel
(`open_image`), so a small file cannot expand into gigabytes of pixels, nor into gigabytes after
the resize that brings its short side to the model's size (a 32768 x 1 strip would become
8 million pixels wide).

Pillow only, no torch: ingestion's spawned decode workers import this module.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192 (192 MiB as RGB): larger images are refused everywhere
MAX_IMAGE_SIDE = 16384  # longest width or height accepted
MAX_ASPECT_RATIO = 16  # longest side / shortest side accepted: dish photos are far squarer than a 16:1 strip
MAX_FILE_BYTES = 64 * 2**20  # default limit on a file's size, checked before it is read
BACKGROUND = (255, 255, 255)  # transparent pixels become white

_AS_IS_FORMATS = ("JPEG", "PNG", "WEBP")  # GIF is read by torchvision too, but it is palette-only
_AS_IS_MODES = ("RGB", "L")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of a whole PNG
_ORIENTATION_TAG = 0x0112
_UNDO_ORIENTATION = {  # EXIF orientation -> the transpose that makes the picture upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class TooManyPixels(ValueError):
    """The header promises an image outside the limits (pixels, side, aspect ratio): a decompression
    bomb, a giant scan or a degenerate strip."""


def open_image(data: bytes) -> Image.Image:
    """Open `data` (header only) and raise `TooManyPixels` before any pixel is decoded.

    Other failures are Pillow's own (`UnidentifiedImageError` for a format it does not know).
    """
    with warnings.catch_warnings():  # Pillow warns (then errors) on bombs above its own, higher limit
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise TooManyPixels(f"decompression bomb: {err}") from None
    problem = size_problem(*image.size)
    if problem is not None:
        image.close()
        raise TooManyPixels(problem)
    return image


def size_problem(width: int, height: int) -> str | None:
    """Why a `width` x `height` image is refused (naming the limit), None when it is within every limit."""
    if width * height > MAX_IMAGE_PIXELS:
        return (f"decompression bomb: {width} x {height} = {width * height:,} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS:,}")
    if max(width, height) > MAX_IMAGE_SIDE:
        return f"image {width} x {height}: a side over the limit of {MAX_IMAGE_SIDE:,} pixels"
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"image {width} x {height}: aspect ratio over the limit of {MAX_ASPECT_RATIO}:1"
    return None


def check_pixel_limit(data: bytes) -> None:
    """Raise `TooManyPixels` if the header promises too many pixels; a header Pillow cannot parse
    passes (the decoder that follows reports it)."""
    try:
        open_image(data).close()
    except TooManyPixels:
        raise
    except Exception:  # noqa: BLE001 - not ours to judge: the real decoder gives the reason
        return


def reencode_reason(image: Image.Image, data: bytes) -> str | None:
    """Why training's decoder would not see what Pillow sees in `data` (None: store the bytes as they are)."""
    if getattr(image, "is_animated", False):
        return "animated (first frame kept)"
    if image.format not in _AS_IS_FORMATS:
        return f"format {image.format}"
    if image.mode not in _AS_IS_MODES:
        return f"mode {image.mode}"
    if "transparency" in image.info:
        return "transparency"
    if _orientation(image) in _UNDO_ORIENTATION:  # 2-8; 1 is upright, and 0 or 9+ mean nothing to either decoder
        return "EXIF orientation"
    if image.format == "PNG" and _png_bit_depth(data) != 8:  # Pillow shows 16-bit RGB PNGs as 8-bit RGB
        return f"{_png_bit_depth(data)}-bit PNG"
    if image.format == "PNG" and _PNG_END not in data[-256:]:  # Pillow reads it, libpng (torchvision) does not
        return "PNG without its end chunk"
    return None


def upright_rgb(image: Image.Image) -> Image.Image:
    """Decode the first frame and return it upright, opaque and 8-bit RGB: what the model should see."""
    orientation = _orientation(image)
    image.load()
    rgb = _to_rgb(image)
    undo = _UNDO_ORIENTATION.get(orientation or 1)
    return rgb.transpose(undo) if undo is not None else rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:  # convert("RGB") would clip every value above 255 to white
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag; None when absent or unreadable (then both decoders ignore it)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken picture
        return None
    return value if isinstance(value, int) else None


def _png_bit_depth(data: bytes) -> int:
    """Bits per sample from the IHDR chunk (always the first chunk of a PNG)."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 0

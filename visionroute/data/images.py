"""Opening one image safely: refuse what cannot be trusted, convert the rest to 8-bit RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "WEBP", "TIFF", "MPO"})
MAX_PIXELS = 64_000_000
"""Larger images are refused as possible decompression bombs (about 8000 x 8000)."""


class ImageRejected(Exception):
    """The file cannot be used as a training image; `str(error)` is the reason, for the skipped list."""


def read_header(path: Path) -> tuple[str, str, tuple[int, int]]:
    """(format, mode, (width, height)) from the header alone; raises ImageRejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt, mode, size = image.format, image.mode, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"refused: over {MAX_PIXELS:,} pixels (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image file (no known image header)") from None
    except OSError as error:
        raise ImageRejected(f"unreadable: {error}") from None
    if path.stat().st_size == 0:
        raise ImageRejected("empty file (0 bytes)")
    if fmt not in ACCEPTED_FORMATS:
        raise ImageRejected(f"unsupported format {fmt}; convert it to JPEG or PNG to include it")
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageRejected(
            f"refused: {size[0]}x{size[1]} is over {MAX_PIXELS:,} pixels (possible decompression bomb)"
        )
    if min(size) < 1:
        raise ImageRejected(f"degenerate size {size[0]}x{size[1]}")
    return fmt, mode, size


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit scaled (not clipped), alpha composited on white, CMYK/palette converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "RGBA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_rgb(path: Path) -> Image.Image:
    """Decode fully, honour EXIF orientation, return 8-bit RGB. Raises ImageRejected with the reason."""
    read_header(path)
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file raises here, not at open()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except OSError as error:
        reason = "truncated file" if "truncated" in str(error) else f"corrupt image data: {error}"
        raise ImageRejected(reason) from None
    except (ValueError, SyntaxError) as error:
        raise ImageRejected(f"corrupt image data: {error}") from None

"""Decoding image files into RGB, and the accounting of files that are not images.

Pillow opens JPEG, PNG, BMP, GIF, WebP (and more). Whatever the mode, the
result is 8-bit RGB: EXIF orientation is applied (a phone photo taken
sideways is shown upright), transparency is composited over white, 16-bit
and 32-bit grey levels are scaled (not clipped) to 8 bits, CMYK is converted.
A file that is not a readable image raises :class:`BadImageError`, which the
data sources count and report instead of crashing mid-epoch.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from jaxtl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
UNREADABLE_FORMAT = "not a readable image (Pillow cannot identify the format)"

# Pillow's own guard against decompression bombs (Image.MAX_IMAGE_PIXELS, ~89 Mpixel in
# Pillow 13, ~179 Mpixel before). Images above it are refused as bad files rather than
# decoded into gigabytes of memory. Read at call time, so it can be lowered.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 178_956_970
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is a bad file, not a grey half-image


class BadImageError(DataError):
    """A file that cannot be decoded as an image (the message names it)."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def file_error_reason(e: OSError) -> str | None:
    """The reason for an OSError that is about the file itself, not its content (None otherwise)."""
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a folder, not a file"
    if getattr(e, "errno", None) == errno.ELOOP:
        return "symbolic link loop"
    return None


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` as an 8-bit RGB PIL image."""
    path = Path(path)
    try:
        # No warnings.catch_warnings() here: it swaps the process-wide filter list and is not
        # thread-safe, and the loader calls this from several threads at once (concurrent use
        # can leave a stray "error" filter behind). The explicit size check below refuses what
        # Pillow only warns about; Pillow itself raises DecompressionBombError above twice that.
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadImageError(f"{path}: {im.width}x{im.height} pixels is over the "
                                    f"{MAX_IMAGE_PIXELS} limit (decompression bomb?)")
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: {UNREADABLE_FORMAT}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # Name file-system problems as such (a symlink loop is not a "corrupt image").
        what = (file_error_reason(e) if isinstance(e, OSError) else None) or "truncated or corrupt image"
        raise BadImageError(f"{path}: {what} ({type(e).__name__}: {str(e)[:80]})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    if im.mode in ("RGB", "L") and im.info.get("transparency") is not None:
        # A PNG colour key (tRNS): pixels of that colour are transparent, so they too are
        # composited over white (returning the RGB image as is showed the key colour).
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if im.mode == "I" and arr.max() <= 255:
            top = 255.0
        grey = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV

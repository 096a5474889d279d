"""Opening the image files people bring: one reader for training, evaluation and the report.

A reference photo, a generated PNG and a report thumbnail must look the same wherever they are
read, so every user image goes through `open_rgb`: upright (EXIF orientation applied), 8-bit RGB,
transparent pixels on white. Pillow's own `convert("RGB")` gets two cases wrong: it clips 16-bit
greys at 255 (a 16-bit PNG turns white) and drops alpha (transparent pixels turn black).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Single-channel integer modes holding 16-bit values. Pillow opens 16-bit grey PNGs as I;16 (older
# versions as I); their values are scaled from [0, 65535] to [0, 255].
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "PA"})
_WHITE = (255, 255, 255, 255)
# diffusers' DreamBooth scripts (PyTorch and Flax) and the authors' code resize with torchvision's
# Resize(..., BILINEAR), which on PIL images is PIL's antialiased bilinear filter.
RESAMPLE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """An image file that cannot be read; the message names the file."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image file that does not exist (also a FileNotFoundError)."""


def open_rgb(path: Path | str, draft_size: int | None = None) -> Image.Image:
    """Returns the image file at `path` as an upright 8-bit RGB image, transparency on white.

    EXIF orientation is applied; 16-bit images are scaled to 8 bits; transparent pixels (an alpha
    channel, a palette's or a colour key's transparency) are composited on white; CMYK, palette and
    other modes are converted.

    Args:
      path: the image file.
      draft_size: for thumbnails: lets a JPEG decode at a reduced scale, still at least
        draft_size x draft_size (it does not resize to it).

    Raises:
      ImageNotFoundError: no file at `path`.
      ImageError: the file is not an image Pillow can decode (truncated, corrupt, unknown mode).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageNotFoundError(f"{path}: image file does not exist") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ImageError(f"{path}: cannot read image ({error})") from error


def read_rgb_array(path: Path | str) -> np.ndarray:
    """Returns the image file at `path` as uint8 (H, W, 3), read as `open_rgb` reads it."""
    return np.array(open_rgb(path), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Returns a decoded image as 8-bit RGB, transparent pixels composited on white."""
    if image.mode in _SIXTEEN_BIT_GREY:
        return _sixteen_bit_grey_to_rgb(image)
    if image.mode == "F":
        raise ValueError("32-bit floating-point pixels have no agreed range; save it as an 8- or "
                         "16-bit PNG")
    if _has_transparency(image):
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    """Returns True when an alpha channel, a palette's alpha or a colour key can hide pixels."""
    return (image.mode in _WITH_ALPHA or "transparency" in image.info
            or (image.mode == "P" and image.palette.mode == "RGBA"))


def _sixteen_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    """Returns a 16-bit grey image as 8-bit RGB (rounded), its transparent colour key white."""
    raw = np.asarray(image).astype(np.int64)
    grey = (np.clip(raw, 0, 65535) * 255 + 32767) // 65535
    key = image.info.get("transparency")
    if isinstance(key, int):
        grey = np.where(raw == key, 255, grey)
    return Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1))


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Returns `image` scaled so its shorter side is `resolution` (torchvision's size rounding)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == resolution:
        return image
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    return image.resize(size, resample=RESAMPLE)

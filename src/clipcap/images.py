"""Image loading shared by validation, embedding (training and evaluation), the CLI and serving.

:func:`load_rgb` is the one way an image file (a path or the bytes of a request) becomes pixels:
size and shape checked from the header before anything is decoded (:func:`open_image`), EXIF
orientation applied, then every mode converted to 8-bit RGB (:func:`to_rgb`): transparency
composited on white, 16-bit and 32-bit grayscale scaled (not clipped) to 8 bits, CMYK, palette,
bilevel and grayscale converted. The encoder's ``preprocess`` then pads and resizes the same way
on every path (:class:`clipcap.modeling.encoders.PadToSquare`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from clipcap.errors import ClipcapError

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


MAX_ASPECT_RATIO = 20.0  # the default bound on the longer side / the shorter side (validate, serve)


class ImageTooLargeError(ClipcapError, ValueError):
    """The header announces more pixels than allowed: the image is not decoded. ``size`` is the
    (width, height) the header gave, None where Pillow's own bomb limit refused it first."""

    def __init__(self, message: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.size = size


class ImageShapeError(ClipcapError, ValueError):
    """The header announces a strip (longer side / shorter side above the bound): the image is not
    decoded. A 5 x 100,000 PNG is 3 KB, but padded to a square it would be 10^10 pixels, and
    resized to the encoder's input it is a line a few pixels wide: nothing a captioner can see."""

    def __init__(self, message: str, size: tuple[int, int]) -> None:
        super().__init__(message)
        self.size = size


def aspect_ratio(width: int, height: int) -> float:
    """The longer side over the shorter (1 for a square; infinite for an empty side)."""
    return max(width, height) / min(width, height) if min(width, height) > 0 else float("inf")


def open_image(path: str | Path | IO[bytes], max_pixels: int | None = None,
               max_aspect_ratio: float | None = None) -> Image.Image:
    """Open ``path`` (or a binary file object) reading only its header; refuse it before decoding
    when it has over ``max_pixels`` pixels (:class:`ImageTooLargeError`) or its longer side is over
    ``max_aspect_ratio`` times its shorter (:class:`ImageShapeError`).

    PIL's own decompression-bomb refusal (twice ``Image.MAX_IMAGE_PIXELS``) is raised as
    :class:`ImageTooLargeError` as well, so callers see one error for "too large".
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{path}: {err}") from err
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(f"{path}: {width}x{height} = {width * height:,} pixels, more than "
                                 f"max_image_pixels={max_pixels:,}", (width, height))
    if max_aspect_ratio is not None and aspect_ratio(width, height) > max_aspect_ratio:
        image.close()
        raise ImageShapeError(f"{path}: {width}x{height}, one side {aspect_ratio(width, height):.0f} times the "
                              f"other, more than max_aspect_ratio={max_aspect_ratio:g}", (width, height))
    return image


def apply_orientation(image: Image.Image) -> Image.Image:
    """The decoded image as it is meant to be seen: EXIF orientation applied."""
    image.load()  # decode errors surface here, not hidden below
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112 = Orientation; 1 = as stored
    except Exception as err:  # broken EXIF blocks are common in real photos: show the pixels as stored
        log.debug("unreadable EXIF (%s): orientation ignored", err)
        orientation = 1
    return image if orientation == 1 else ImageOps.exif_transpose(image)


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) grayscale scaled to 8 bits.

    ``I;16*`` is scaled by 255/65535 (65535 -> 255). ``I`` holding 0..255 is kept, 0..65535 is
    scaled like 16 bits, anything wider is stretched from its min to its max. ``F`` holding 0..1
    is multiplied by 255, 0..255 kept, anything else stretched.
    """
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scale_low, scale_high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scale_low, scale_high = 0.0, 1.0
    elif low >= 0 and high <= 255:
        scale_low, scale_high = 0.0, 255.0
    elif image.mode == "I" and low >= 0 and high <= 65535:
        scale_low, scale_high = 0.0, 65535.0
    else:
        scale_low, scale_high = low, max(high, low + 1)
    scaled = np.clip(np.rint((values - scale_low) * 255.0 / (scale_high - scale_low)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 2-D -> mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB; transparent pixels become white (stamps and icons are drawn on
    transparent backgrounds: a plain ``convert("RGB")`` would put them on black)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_GRAY_MODES:
        return _wide_gray_to_l(image).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_rgb(path: str | Path | IO[bytes], max_pixels: int | None = None,
             max_aspect_ratio: float | None = None) -> Image.Image:
    """Open an image (a path or a binary file object) as 8-bit RGB: size and shape checked from the
    header (``max_pixels``, ``max_aspect_ratio``), EXIF orientation applied, every mode converted
    (:func:`to_rgb`)."""
    with open_image(path, max_pixels, max_aspect_ratio) as image:
        rgb = to_rgb(apply_orientation(image))
        return rgb.copy() if rgb is image else rgb  # closing ``image`` would invalidate it

"""What a served captioner accepts: images as raw or base64-encoded bytes (file paths only inside
``serve.image_root``), checked against :class:`clipcap.config.ServeConfig` before anything is decoded,
and decoding params within its bounds. Every refusal is a :class:`RequestError` with a one-line
reason naming the image (by position) or the param and the limit: never a traceback, never the payload.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clipcap.config import ConfigError, DecodingConfig, ServeConfig, config_from_mapping
from clipcap.errors import ClipcapError
from clipcap.images import ImageTooLargeError, open_image

MAX_PATH_CHARS = 4096
HELD_SIDE = 1024  # a request's images are held at most this large (encoders take 224-384 px): 3 MB each


class RequestError(ClipcapError, ValueError):
    """A request the served model refuses (the client's to fix: HTTP 400)."""


def _allowed_path(text: str, root: str | None) -> Path | None:
    """``text`` as a file inside ``root`` (symlinks resolved), or None."""
    if root is None or len(text) > MAX_PATH_CHARS or "\n" in text:
        return None
    base = Path(root).resolve()
    try:
        path = (base / text).resolve()  # an absolute text stays itself
    except (OSError, ValueError):
        return None
    return path if path.is_relative_to(base) and path.is_file() else None


def _encoded_bytes(value, index: int, limits: ServeConfig) -> bytes | Path:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        path = _allowed_path(value, limits.image_root)
        if path is not None:
            if path.stat().st_size > limits.max_image_bytes:
                raise RequestError(f"image {index}: {path.stat().st_size} bytes; at most {limits.max_image_bytes} "
                                   "(serve.max_image_bytes)")
            return path
        if len(value) > (limits.max_image_bytes + 2) // 3 * 4 + 4:  # refused before decoding
            raise RequestError(f"image {index}: more than {limits.max_image_bytes} bytes (serve.max_image_bytes)")
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            hint = ("; a served model does not open file paths (serve.image_root allows one folder)"
                    if "/" in value[:MAX_PATH_CHARS] or "." in value[-8:] else "")
            raise RequestError(f"image {index}: not base64-encoded image bytes{hint}") from None
    else:
        raise RequestError(f"image {index}: expected base64 text or bytes, got {type(value).__name__}")
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"image {index}: {len(data)} bytes; at most {limits.max_image_bytes} (serve.max_image_bytes)")
    return data


def request_image(value, index: int, limits: ServeConfig) -> Image.Image:
    """One image of a request, decoded to RGB after its header passed the size checks, and held at
    most ``HELD_SIDE`` pixels on its longer side (JPEGs are decoded at reduced size directly), so a
    full request of large photos takes tens of megabytes, not gigabytes."""
    source = _encoded_bytes(value, index, limits)
    try:
        image = open_image(source if isinstance(source, Path) else io.BytesIO(source), limits.max_image_pixels)
    except ImageTooLargeError as err:  # from the header; size None: past Pillow's own bomb limit
        found = (f"{err.size[0]}x{err.size[1]} pixels; at most" if err.size else "more pixels than")
        raise RequestError(f"image {index}: {found} {limits.max_image_pixels} (serve.max_image_pixels)") from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(f"image {index}: not an image format this server reads") from None
    try:
        image.draft("RGB", (HELD_SIDE, HELD_SIDE))
        image = image.convert("RGB")
        image.thumbnail((HELD_SIDE, HELD_SIDE), Image.Resampling.BICUBIC)
        return image
    except (OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(f"image {index}: the image data is damaged") from None


def check_request_size(count: int, limits: ServeConfig) -> None:
    if count == 0:
        raise RequestError("no images in the request")
    if count > limits.max_images:
        raise RequestError(f"{count} images in one request; at most {limits.max_images} (serve.max_images)")


def request_decoding(params: dict | None, limits: ServeConfig) -> DecodingConfig:
    """The request's decoding params (``DecodingConfig`` fields), refused beyond the server's bounds."""
    try:
        decoding = config_from_mapping(DecodingConfig, dict(params or {}), "params")
    except ConfigError as err:
        raise RequestError(str(err)) from None
    for name, limit in (("num_beams", limits.max_num_beams), ("num_captions", limits.max_num_captions),
                        ("max_new_tokens", limits.max_new_tokens)):
        if getattr(decoding, name) > limit:
            raise RequestError(f"params.{name}={getattr(decoding, name)}; this server allows at most {limit} "
                               f"(serve.max_{name.removeprefix('max_')})")
    return decoding

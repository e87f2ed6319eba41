"""What a served captioner accepts: images as raw or base64-encoded bytes (file paths only inside
``serve.image_root``), checked against :class:`clipcap.config.ServeConfig` before anything is decoded
(bytes, pixels and shape per image, pixels per request), decoded by the same loader as training and
the CLI, and decoding params within its bounds. Every refusal is a :class:`RequestError` with a one-line
reason naming the image (by position) or the param and the limit: never a traceback, never the payload.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clipcap.config import ConfigError, DecodingConfig, ServeConfig, config_from_mapping
from clipcap.errors import ClipcapError
from clipcap.images import ImageShapeError, ImageTooLargeError, load_rgb, open_image
from clipcap.modeling.encoders import Pixels, pixels_of

MAX_PATH_CHARS = 4096
REFUSAL_MARK = "clipcap_refusal"  # in the JSON of a served model's own refusals: a server passes them on as they are


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


class RequestTimeout(RequestError):
    """The request's images took longer to decode than its time budget (HTTP 504)."""


Source = bytes | Path  # a request's image: encoded bytes, or a file inside serve.image_root


def _open(source: Source, index: int, limits: ServeConfig) -> Image.Image:
    """The image's header, checked against the per-image bounds (nothing decoded yet)."""
    try:
        return open_image(source if isinstance(source, Path) else io.BytesIO(source), limits.max_image_pixels,
                          limits.max_aspect_ratio)
    except ImageTooLargeError as err:  # from the header; size None: past Pillow's own bomb limit
        found = (f"{err.size[0]}x{err.size[1]} pixels; at most" if err.size else "more pixels than")
        raise RequestError(f"image {index}: {found} {limits.max_image_pixels} (serve.max_image_pixels)") from None
    except ImageShapeError as err:
        raise RequestError(f"image {index}: {err.size[0]}x{err.size[1]}, one side more than "
                           f"{limits.max_aspect_ratio:g} times the other (serve.max_aspect_ratio)") from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(f"image {index}: not an image format this server reads") from None
    except Exception:  # Pillow refuses oversized text/ICC chunks and odd headers with ValueError and others
        raise RequestError(f"image {index}: the image header is damaged or unsupported") from None


def request_sources(values: list, limits: ServeConfig) -> list[Source]:
    """A request's images as bytes (or allowed paths), each within the per-image bounds and all of them
    within ``serve.max_request_pixels``, from their headers: nothing is decoded yet."""
    sources = [_encoded_bytes(value, index, limits) for index, value in enumerate(values)]
    total = 0
    for index, source in enumerate(sources):
        with _open(source, index, limits) as image:
            total += image.width * image.height
        if total > limits.max_request_pixels:
            raise RequestError(f"images 0-{index}: {total:,} pixels in all; at most {limits.max_request_pixels:,} "
                               "per request (serve.max_request_pixels): send fewer or smaller images")
    return sources


def request_pixels(values: list, limits: ServeConfig, preprocess, deadline: float | None = None) -> list[Pixels]:
    """The encoder inputs of a request's images: checked from their headers (:func:`request_sources`),
    then each decoded by the loader training and ``clipcap caption`` use (:func:`clipcap.images.load_rgb`:
    transparency on white, EXIF orientation) and preprocessed at once, so a request holds small tensors,
    never its decoded images. Past ``deadline`` (``time.monotonic()``) it stops with :class:`RequestTimeout`."""
    pixels = []
    for index, source in enumerate(request_sources(values, limits)):
        if deadline is not None and time.monotonic() > deadline:
            raise RequestTimeout(f"decoding the images took longer than serve.max_seconds={limits.max_seconds:g} "
                                 f"(stopped at image {index} of {len(values)}): send fewer or smaller images")
        try:
            image = load_rgb(source if isinstance(source, Path) else io.BytesIO(source), limits.max_image_pixels,
                             limits.max_aspect_ratio)
        except RequestError:
            raise
        except Exception:
            raise RequestError(f"image {index}: the image data is damaged or unsupported") from None
        pixels.append(pixels_of(image, preprocess))
    return pixels


def check_request_size(count: int, limits: ServeConfig) -> None:
    if count == 0:
        raise RequestError("no images in the request")
    if count > limits.max_images:
        raise RequestError(f"{count} images in one request; at most {limits.max_images} (serve.max_images)")


def request_decoding(params: dict | None, limits: ServeConfig) -> DecodingConfig:
    """The request's decoding params (``DecodingConfig`` fields), refused beyond the server's bounds."""
    try:
        decoding = config_from_mapping(DecodingConfig, params, "params")
    except ConfigError as err:
        raise RequestError(str(err)) from None
    for name, limit in (("num_beams", limits.max_num_beams), ("num_captions", limits.max_num_captions),
                        ("max_new_tokens", limits.max_new_tokens)):
        if getattr(decoding, name) > limit:
            raise RequestError(f"params.{name}={getattr(decoding, name)}; this server allows at most {limit} "
                               f"(serve.max_{name.removeprefix('max_')})")
    return decoding

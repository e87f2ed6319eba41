"""Builders of test images on disk: every mode, EXIF orientation, broken and oversized files."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def noise(path: Path, size=(64, 48), seed: int = 0, **kwargs) -> Path:
    """An RGB image of random pixels (so that each one has its own content hash)."""
    rng = random.Random(seed)
    return save(Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)), path, **kwargs)


def truncated(path: Path, fmt: str = "JPEG") -> Path:
    """The first half of a real image file."""
    full = noise(path, seed=99, format=fmt)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims ``width`` x ``height`` (1-bit gray): a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def cmyk_jpeg(path: Path, size=(32, 24)) -> Path:
    """Pure red written as CMYK (C=0, M=Y=255, K=0)."""
    return save(Image.new("CMYK", size, (0, 255, 255, 0)), path, format="JPEG", quality=95)


def gray16_png(path: Path, size=(32, 24)) -> Path:
    """16-bit grayscale: left half 65535 (white), right half 0, pixel (0, 1) = 1000, pixel (1, 1) = 32896."""
    width, height = size
    values = np.zeros((height, width), dtype=np.uint16)
    values[:, : width // 2] = 65535
    values[1, 0], values[1, 1] = 1000, 32896
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return save(image, path, format="PNG")


def exif_rotated_jpeg(path: Path, orientation: int = 6, size=(40, 20)) -> Path:
    """A red image whose stored top-left 10x10 block is blue, tagged with an EXIF orientation."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(image, path, format="JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency(path: Path, size=(32, 24)) -> Path:
    """Palette PNG: index 0 transparent (its colour black), index 1 red on the right half."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (size[0] // 2, 0, size[0], size[1]))
    return save(image, path, format="PNG", transparency=0)


def la_png(path: Path, size=(32, 24)) -> Path:
    """Gray + alpha: left half transparent black, right half opaque gray 100."""
    image = Image.new("LA", size, (0, 0))
    image.paste((100, 255), (size[0] // 2, 0, size[0], size[1]))
    return save(image, path, format="PNG")


def near(pixel, expected, tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))

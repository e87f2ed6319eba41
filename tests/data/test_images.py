"""load_rgb: every mode to correct 8-bit RGB, EXIF orientation, and size refused before decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipcap.config import ValidateConfig
from clipcap.images import ImageTooLargeError, load_rgb, open_image
from clipcap.data.validate import check_image

from imagefiles import (
    BLUE,
    RED,
    cmyk_jpeg,
    exif_rotated_jpeg,
    gray16_png,
    la_png,
    near,
    palette_with_transparency,
    png_header,
    save,
)


def test_cmyk_becomes_the_same_colour_in_rgb(tmp_path):
    rgb = load_rgb(cmyk_jpeg(tmp_path / "cmyk.jpg"))
    assert rgb.mode == "RGB" and near(rgb.getpixel((5, 5)), RED)


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    path = gray16_png(tmp_path / "gray16.png")
    assert Image.open(path).mode == "I;16"
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)      # 65535
    assert rgb.getpixel((31, 0)) == (0, 0, 0)           # 0
    assert rgb.getpixel((0, 1)) == (4, 4, 4)            # 1000 * 255 / 65535 = 3.9 (a plain convert gives 255)
    assert rgb.getpixel((1, 1)) == (128, 128, 128)      # 32896 = 128 * 257


@pytest.mark.parametrize(("mode", "values", "expected"), [
    ("I", [0, 255, 128], [0, 255, 128]),                       # 32-bit holding 8-bit values: kept
    ("I", [0, 65535, 32896], [0, 255, 128]),                   # 32-bit holding 16-bit values: scaled like 16 bits
    ("I", [-1000, 1000, 0], [0, 255, 128]),                    # anything wider: stretched min..max
    ("F", [0.0, 1.0, 0.5], [0, 255, 128]),                     # float 0..1
])
def test_wide_gray_modes(tmp_path, mode, values, expected):
    array = np.array([values * 8] * 16, dtype=np.int32 if mode == "I" else np.float32)
    path = save(Image.fromarray(array, mode), tmp_path / "wide.tif", format="TIFF")
    assert Image.open(path).mode == mode
    rgb = load_rgb(path)
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == expected
    assert rgb.mode == "RGB"


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    rgb = load_rgb(palette_with_transparency(tmp_path / "p.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)      # transparent black -> white, not black
    assert rgb.getpixel((31, 0)) == RED


def test_gray_with_alpha_is_composited_on_white(tmp_path):
    rgb = load_rgb(la_png(tmp_path / "la.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((31, 0)) == (100, 100, 100)


def test_rgba_gray_bilevel_and_plain_palette(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (0, 255, 0, 0))
    rgba.paste((0, 255, 0, 255), (10, 0, 20, 20))
    rgb = load_rgb(save(rgba, tmp_path / "rgba.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((15, 0)) == (0, 255, 0)
    assert load_rgb(save(Image.new("L", (20, 20), 77), tmp_path / "l.png")).getpixel((3, 3)) == (77, 77, 77)
    assert load_rgb(save(Image.new("1", (20, 20), 1), tmp_path / "1.png")).getpixel((3, 3)) == (255, 255, 255)
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    assert load_rgb(save(palette, tmp_path / "pal.png")).getpixel((3, 3)) == (10, 200, 30)


@pytest.mark.parametrize(("orientation", "size", "blue_corner"), [
    (1, (40, 20), (4, 4)),        # as stored: blue top-left
    (3, (40, 20), (35, 15)),      # rotated 180: bottom-right
    (6, (20, 40), (15, 4)),       # rotated 90 clockwise to display: top-right, width and height swapped
    (8, (20, 40), (4, 35)),       # rotated 90 counter-clockwise: bottom-left
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, blue_corner):
    rgb = load_rgb(exif_rotated_jpeg(tmp_path / f"o{orientation}.jpg", orientation))
    assert rgb.size == size
    assert near(rgb.getpixel(blue_corner), BLUE, 12)
    far = (size[0] - 1 - blue_corner[0], size[1] - 1 - blue_corner[1])
    assert near(rgb.getpixel(far), RED, 12)


def test_size_is_refused_from_the_header_before_decoding(tmp_path):
    path = png_header(tmp_path / "big.png", 5000, 4000)  # 20 M pixels claimed; a few bytes on disk
    with pytest.raises(ImageTooLargeError, match="5000x4000 = 20,000,000 pixels, more than max_image_pixels=10,000,000"):
        load_rgb(path, max_pixels=10_000_000)
    assert "validate.max_image_pixels=10,000,000" in check_image(path, ValidateConfig(max_image_pixels=10_000_000))[1]
    with open_image(path, max_pixels=None) as image:   # without a limit the header still opens
        assert image.size == (5000, 4000)


def test_decompression_bomb_is_our_error_not_pils(tmp_path):
    path = png_header(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels: PIL itself refuses to open it
    with pytest.raises(ImageTooLargeError) as err:
        open_image(path, max_pixels=10**12)
    assert not isinstance(err.value, Image.DecompressionBombError)
    assert check_image(path, ValidateConfig(max_image_pixels=10**9))[0] == "too_large"


def test_strips_are_refused_from_the_header_at_the_bound(tmp_path):
    from clipcap.images import ImageShapeError

    strip = png_header(tmp_path / "strip.png", 5, 100_000)  # 3 KB; never decoded
    with pytest.raises(ImageShapeError, match=r"5x100000, one side 20000 times the other, more than max_aspect_ratio=32"):
        load_rgb(strip, max_aspect_ratio=32)
    assert check_image(strip, ValidateConfig())[0] == "bad_shape"
    assert "validate.max_aspect_ratio=32" in check_image(strip, ValidateConfig())[1]
    at = save(Image.new("L", (40, 10), 9), tmp_path / "at.png")
    past = save(Image.new("L", (10, 41), 9), tmp_path / "past.png")
    assert load_rgb(at, max_aspect_ratio=4).size == (40, 10)
    with pytest.raises(ImageShapeError):
        load_rgb(past, max_aspect_ratio=4)
    assert check_image(past, ValidateConfig(max_aspect_ratio=4))[0] == "bad_shape"
    assert check_image(past, ValidateConfig(max_aspect_ratio=4.1)) is None

"""Image loading shared by embedding, validation and inference."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB: EXIF orientation applied, transparency composited on white.

    Stamps and icons are drawn on transparent backgrounds; a plain ``convert("RGB")`` would
    put them on black (or on whatever colour the hidden pixels hold).
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, BACKGROUND)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return image.convert("RGB")

"""Sources of captioned images: each yields :class:`CaptionedImage` records.

- ``tuxpaint``: the Tux Paint stamps (``X.png`` + line 1 of ``X.txt``), category = top folder.
- ``folder``: a directory of images plus ``captions.jsonl`` or ``captions.csv`` whose rows
  name an image path relative to the folder and one caption (``caption``) or several
  (``captions``); an optional ``category`` column.

User batches dropped under the ``data/`` folder use the ``folder`` format, one batch per
sub-folder (or ``data/`` itself).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipcap.errors import ClipcapError

TUXPAINT_DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
CAPTION_FILES = ("captions.jsonl", "captions.csv")


class SourceError(ClipcapError, ValueError):
    """A source folder or captions file cannot be read."""


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    captions: tuple[str, ...]
    category: str
    source: str


def iter_tuxpaint(root: str | Path | None = None) -> Iterator[CaptionedImage]:
    root = Path(root) if root else TUXPAINT_DEFAULT_ROOT
    if not root.is_dir():
        raise SourceError(
            f"Tux Paint stamps not found at {root}: install them with "
            "'apt-get install --no-install-recommends tuxpaint-stamps-default' or set dataset.root"
        )
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.exists():  # mirrored variants (X_mirror.png) have no description of their own
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = lines[0].strip() if lines else ""
        category = png.relative_to(root).parts[0] if len(png.relative_to(root).parts) > 1 else "other"
        yield CaptionedImage(png, (caption,), category, "tuxpaint")


def _rows_from_file(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from err
                if not isinstance(row, dict):
                    raise SourceError(f"{path}:{number}: expected a JSON object with 'image' and 'caption'")
                yield number, row
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                yield number, row


def iter_folder(root: str | Path, source: str | None = None) -> Iterator[CaptionedImage]:
    """Read one folder batch: images plus ``captions.jsonl`` or ``captions.csv``."""
    root = Path(root)
    found = [root / name for name in CAPTION_FILES if (root / name).exists()]
    if not found:
        raise SourceError(f"{root}: no captions file; add {' or '.join(CAPTION_FILES)} beside the images")
    grouped: dict[str, tuple[list[str], str]] = {}
    for number, row in _rows_from_file(found[0]):
        image = row.get("image")
        if not image:
            raise SourceError(f"{found[0]}:{number}: missing 'image' (path relative to {root})")
        captions = row.get("captions") or row.get("caption")
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise SourceError(f"{found[0]}:{number}: missing 'caption' for image {image!r}")
        entry = grouped.setdefault(str(image), ([], str(row.get("category") or root.name)))
        entry[0].extend(str(c) for c in captions)
    for image, (captions, category) in grouped.items():
        yield CaptionedImage(root / image, tuple(captions), category, source or root.name)


def iter_batches(batches_dir: str | Path) -> Iterator[CaptionedImage]:
    """Every user batch under ``batches_dir``: the folder itself and each sub-folder with a captions file."""
    batches_dir = Path(batches_dir)
    if not batches_dir.is_dir():
        return
    folders = [batches_dir, *sorted(p for p in batches_dir.iterdir() if p.is_dir())]
    for folder in folders:
        if any((folder / name).exists() for name in CAPTION_FILES):
            yield from iter_folder(folder, source=f"batch:{folder.name}")

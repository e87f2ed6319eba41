"""The Open Clip Art Library (Debian ``openclipart-png`` + ``openclipart-svg``, public domain).

``<root>/png/<category>/.../X.png`` is the image; its SVG twin ``<root>/svg/<category>/.../X.svg``
holds the RDF metadata whose ``<dc:title>`` (of the work, not of its creator or publisher agents)
becomes the caption, through :func:`caption_from_title`. The description is used only when the
title is empty: most descriptions are empty, an e-mail address or the collection's notes
("EPS converted from http://aiga.org"), so they are no better than the title they would replace.

The titles are noisy: collection and theme names given to hundreds of images, and file-like names
(``russian_federation``, ``Rana03``, ``CFbulb-lit``). This module only normalises the text; the
``validate`` stage quarantines what normalisation cannot save (boilerplate, repeated and
uninformative captions: see :mod:`clipcap.data.validate`).

One record per PNG, symlinked ones included (the package links an image into a second category):
the same picture with the same caption is then a ``duplicate`` for validation, as in the tuxpaint
source. A PNG without its SVG twin is a ``missing_field`` row, an SVG whose XML does not parse an
``invalid_metadata`` row.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from clipcap.data.sources import (INVALID_METADATA, MISSING_FIELD, UNSAFE_PATH, SourceError, SourceRecord,
                                  resolve_image, shown)

OPENCLIPART_DEFAULT_ROOT = Path("/usr/share/openclipart")
PACKAGES = "openclipart-png openclipart-svg"
SOURCE = "openclipart"

_DC = "{http://purl.org/dc/elements/1.1/}"
_ATTRIBUTION = re.compile(r"^clip ?art by [^-]+? -( |$)", re.IGNORECASE)  # "Clipart by Nicu Buculei - jigsaw_red_10"
_EXTENSION = re.compile(r"\.(svg|png|jpe?g|gif)$", re.IGNORECASE)
_SEPARATORS = re.compile(r"[_\-#.]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z]{2})(?=[a-z])")  # BlueMan -> Blue Man, CFbulb -> CF bulb
_LETTER_DIGIT = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")  # Rana03 -> Rana 03
_NUMBER = re.compile(r"^\d+$")
_PADDED_NUMBER = re.compile(r"\s+(#\d+|0\d+)$")                       # "Leone 01", "horse #2"
_C1 = re.compile("[\x80-\x9f]")


def fix_text(text: str) -> str:
    """HTML entities left in the title decoded (``d&#39;Aosta``), and UTF-8 or cp1252 bytes that were read as
    Latin-1 repaired (``L&Atilde;&copy;zard`` -> ``Lézard``, ``Ale\\x9a`` -> ``Aleš``) where that is possible."""
    text = html.unescape(text)
    if any("\x80" <= ch <= "\xff" for ch in text):
        try:
            return text.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass
        if _C1.search(text):
            try:
                return text.encode("latin-1").decode("cp1252")
            except UnicodeError:
                pass
    return text


def _split_file_name(title: str) -> str:
    """A title without spaces read as a file name: separators (``_ - # .``), camel case and letter-digit
    boundaries become spaces, and trailing numbers go (``Rana03``, ``jigsaw_red_10``). A capital that only marks
    a camel-case boundary is lower-cased (``BlueMan`` -> ``Blue man``); other capitals stay (``AIGA_Symbol``).
    After an upper-case run, a lower-case letter starts a word (``CFbulb`` -> ``CF bulb``; the library has no
    ``HTMLParser``-like titles, which this would cut after the P)."""
    words = []
    for chunk in _SEPARATORS.split(title):
        parts = _CAMEL.sub(" ", chunk).split()
        parts = parts[:1] + [p.lower() if p[:1].isupper() and p[1:].islower() else p for p in parts[1:]]
        for part in parts:
            words += _LETTER_DIGIT.sub(" ", part).split()
    while len(words) > 1 and _NUMBER.match(words[-1]):
        words.pop()
    return " ".join(words)


def caption_from_title(title: str) -> str:
    """The caption made from an Open Clip Art title: e.g. ``russian_federation`` -> ``Russian federation.``,
    ``Rana03`` -> ``Rana.``, ``CFbulb-lit`` -> ``CF bulb lit.``, ``Clipart by Nicu Buculei - jigsaw_red_10`` ->
    ``Jigsaw red.``; an empty title gives "".

    Entities and mis-decoded characters are repaired (:func:`fix_text`), whitespace is collapsed, the
    ``Clipart by <author> - `` prefix and a file extension are dropped. A title without spaces is a file name
    (:func:`_split_file_name`); a title with spaces keeps its words, without a zero-padded or ``#`` number at
    the end ("Leone 01"). The first letter is capitalised and a full stop ends the caption. The authors'
    capitals inside a title with spaces are kept: they are mostly proper nouns ("France - Brittany"), and the
    caption metrics lower-case anyway.
    """
    text = _EXTENSION.sub("", _ATTRIBUTION.sub("", " ".join(fix_text(title).split()))).strip()
    if " " in text:
        text = _PADDED_NUMBER.sub("", " ".join(text.replace("_", " ").split()))
    else:
        text = _split_file_name(text)
    text = text.strip(" -,;:")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def read_metadata(svg: Path) -> tuple[str, str]:
    """The work's ``<dc:title>`` and ``<dc:description>`` (each "" when absent) from an SVG's RDF metadata.

    Parsing stops at the end of ``<metadata>``: the drawing after it is never read. Titles inside
    ``<cc:Agent>`` (creator, publisher, rights) are not the work's. Raises ``ET.ParseError``.
    """
    found: dict[str, str] = {}
    parents: list[str] = []
    with Path(svg).open("rb") as handle:
        for event, element in ET.iterparse(handle, events=("start", "end")):
            if event == "start":
                parents.append(element.tag)
                continue
            parents.pop()
            name = element.tag.removeprefix(_DC)
            if name in ("title", "description") and element.tag.startswith(_DC) and name not in found \
                    and not (parents and parents[-1].endswith("}Agent")):
                found[name] = "".join(element.itertext())
            if element.tag.endswith("}metadata") or len(found) == 2:
                break
    return found.get("title", ""), found.get("description", "")


def iter_openclipart(root: str | Path | None = None) -> Iterator[SourceRecord]:
    """One record per ``png/**/*.png`` under ``root`` (default /usr/share/openclipart), captioned from its SVG twin."""
    root = Path(root) if root else OPENCLIPART_DEFAULT_ROOT
    pngs, svgs = root / "png", root / "svg"
    for folder, package in ((pngs, "openclipart-png"), (svgs, "openclipart-svg")):
        if not folder.is_dir():
            raise SourceError(f"Open Clip Art Library not found: {folder} is missing ({package}); install it with "
                              f"'apt-get install --no-install-recommends {PACKAGES}' or set dataset.root to the "
                              "folder holding png/ and svg/")
    for png in sorted(pngs.rglob("*.png")):
        relative = png.relative_to(pngs)
        category = relative.parts[0] if len(relative.parts) > 1 else "other"
        svg = svgs / relative.with_suffix(".svg")
        path, why = resolve_image(pngs, relative.as_posix())
        if path is None:
            yield SourceRecord(str(svg), str(png), "", category, SOURCE, problem=UNSAFE_PATH, detail=why)
            continue
        if not svg.is_file():
            yield SourceRecord(str(svg), str(png), "", category, SOURCE, problem=MISSING_FIELD,
                               detail=f"no SVG twin {svg} holding the title ({PACKAGES.split()[1]})")
            continue
        try:
            title, description = read_metadata(svg)
        except (ET.ParseError, OSError) as err:
            yield SourceRecord(str(svg), str(png), "", category, SOURCE, problem=INVALID_METADATA,
                               detail=f"{svg}: the SVG does not parse ({shown(str(err))})")
            continue
        field, text = ("title", title) if title.strip() else ("description", description.strip().split("\n")[0])
        yield SourceRecord(f"{svg}:{field}", str(png), caption_from_title(text), category, SOURCE)

"""Sources of captioned images: each yields one :class:`SourceRecord` per (image, caption) pair.

- ``tuxpaint``: the Tux Paint stamps (``X.png`` + line 1 of ``X.txt``), category = top folder.
- ``openclipart``: the Open Clip Art Library (PNG + the title in its SVG twin): see
  :mod:`clipcap.data.openclipart`.
- ``folder``: a directory of images plus ``captions.jsonl`` or ``captions.csv`` whose rows
  name an image path relative to the folder and one caption (``caption``) or several
  (``captions``); an optional ``category`` column.
- ``karpathy`` and ``nocaps`` (annotation JSON files): see :mod:`clipcap.data.formats`.

User batches dropped under the ``data/`` folder use the ``folder`` format, one batch per
sub-folder (or ``data/`` itself).

Reading never stops at a bad row: a line that is not UTF-8, JSON or CSV, a row without an
image or caption, or an image path leaving the folder (``..``, an absolute path, a symlink
pointing out) becomes a record whose ``problem`` is a reason code; the ``validate`` stage
quarantines it. The folder, Karpathy and nocaps sources make the path and caption checks
with one function, :func:`caption_records`. Only a missing folder or captions file is an
error (:class:`SourceError`). Every record's caption is in Unicode NFC (composed) form, whatever
the source wrote, so that one text is one string.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from clipcap.errors import ClipcapError

log = logging.getLogger(__name__)

TUXPAINT_DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")
CAPTION_FILES = ("captions.jsonl", "captions.csv")

# Reason codes of records that could not be read properly (the validate stage adds its own).
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
INVALID_CSV = "invalid_csv"
MISSING_FIELD = "missing_field"
UNSAFE_PATH = "unsafe_path"
BAD_SPLIT = "bad_split"
INVALID_METADATA = "invalid_metadata"  # openclipart: the SVG holding the title does not parse
LINE_TOO_LONG = "line_too_long"        # a captions.jsonl line longer than MAX_LINE_BYTES: skipped unread
MAX_LINE_BYTES = 1 << 20               # no caption needs a megabyte; a longer line is never held in memory

_SURROGATES = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or "\ud800" JSON escapes
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_SHOWN_CHARS = 200


class SourceError(ClipcapError, ValueError):
    """A source folder or captions file cannot be read at all."""


@dataclass(frozen=True)
class SourceRecord:
    """One input row: an image and one of its captions, or a row that could not be read."""

    origin: str                # where it was read, e.g. "data/b1/captions.jsonl:12"
    path: str                  # the image file ("" when the row names none; the raw name for unsafe paths)
    caption: str               # as written, in Unicode NFC (validation normalises whitespace)
    category: str
    source: str
    split: str | None = None   # the dataset's own split (karpathy, nocaps); None: seeded hash of the image
    domain: str | None = None  # nocaps: in-domain / near-domain / out-domain
    problem: str | None = None  # a reason code when the row could not be read properly
    detail: str = ""            # what exactly is wrong, for the quarantine file

    def __post_init__(self) -> None:
        # One spelling per text: "café" typed as é or as e + U+0301 is the same caption to the duplicate
        # and repeat checks, the datastore and the tokenizer, whichever source it came from.
        if isinstance(self.caption, str) and not self.caption.isascii():
            object.__setattr__(self, "caption", unicodedata.normalize("NFC", self.caption))


def shown(text: str | bytes, limit: int = _SHOWN_CHARS) -> str:
    """``text`` made printable and short for messages (bad bytes as ``\\xff``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")  # lone surrogates -> \\udcff
    return text if len(text) <= limit else text[:limit] + "..."


def visible(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x07``, ``\\t``), for reports."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def has_surrogates(text: str) -> bool:
    return _SURROGATES.search(text) is not None


def resolve_image(roots: Path | Sequence[Path], name: str) -> tuple[Path | None, str]:
    """The image ``name`` (relative) under one of ``roots``, or ``(None, why)`` when it would escape.

    Absolute names, ``..`` components and paths that resolve (through symlinks) outside the root
    are refused. With several roots the first one holding the file wins (the first root otherwise).
    Backslashes count as separators, so ``images\\a.jpg`` written on Windows works.
    """
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    normal = name.replace("\\", "/")
    if "\x00" in name:
        return None, "path contains a NUL character"
    if normal.startswith("/") or PureWindowsPath(name).drive:
        return None, f"absolute path {name!r}; give it relative to the dataset folder"
    relative = PurePosixPath(normal)
    if ".." in relative.parts:
        return None, f"path {name!r} climbs out of the dataset folder with '..'"
    candidates = [root / relative for root in roots]
    chosen = next((c for c in candidates if _exists(c)), candidates[0])
    root = roots[candidates.index(chosen)]
    try:
        real, real_root = chosen.resolve(), root.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        return None, f"path {name!r} cannot be resolved ({err})"
    if not real.is_relative_to(real_root):
        return None, f"path {name!r} resolves to {real}, outside the dataset folder {root} (a symlink pointing out?)"
    return chosen, ""


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, ...: reported later as missing or unreadable
        return False


def caption_records(roots: Path | Sequence[Path], name: str, captions: Iterable[tuple[str, Any]],
                    **fields: Any) -> Iterator[SourceRecord]:
    """One record per ``(origin, caption)`` of the image ``name`` (relative to ``roots``).

    The record gets a ``problem`` when the image path holds a lone surrogate (``invalid_utf8``) or
    leaves the roots (``unsafe_path``, see :func:`resolve_image`), or when its caption is not a
    string (``missing_field``) or holds a lone surrogate (``invalid_utf8``). ``fields`` are the
    other :class:`SourceRecord` fields (category, source, split, domain). The folder, Karpathy and
    nocaps sources all build their records here.
    """
    if has_surrogates(name):
        path, problem, why = None, INVALID_UTF8, "the image path holds an invalid character (a lone surrogate escape)"
    else:
        path, why = resolve_image(roots, name)
        problem = UNSAFE_PATH
    for origin, caption in captions:
        if path is None:
            yield SourceRecord(origin, name, caption if isinstance(caption, str) else "", problem=problem,
                               detail=why, **fields)
        elif not isinstance(caption, str):
            yield SourceRecord(origin, str(path), "", problem=MISSING_FIELD,
                               detail=f"caption {shown(repr(caption))} is not a string", **fields)
        elif has_surrogates(caption):
            yield SourceRecord(origin, str(path), shown(caption), problem=INVALID_UTF8,
                               detail="the caption holds an invalid character (a lone surrogate escape)", **fields)
        else:
            yield SourceRecord(origin, str(path), caption, **fields)


def limit_images(records: Iterable[SourceRecord], limit: int | None) -> Iterator[SourceRecord]:
    """The records of the first ``limit`` distinct images (all records when ``limit`` is None)."""
    if limit is None:
        yield from records
        return
    seen: set[str] = set()
    for record in records:
        if record.path in seen:
            yield record
        elif len(seen) < limit:
            if record.path:
                seen.add(record.path)
            yield record


# ---------------------------------------------------------------- tuxpaint
def iter_tuxpaint(root: str | Path | None = None) -> Iterator[SourceRecord]:
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
        parts = png.relative_to(root).parts
        category = parts[0] if len(parts) > 1 else "other"
        first = txt.read_bytes().split(b"\n", 1)[0].rstrip(b"\r").removeprefix(b"\xef\xbb\xbf")
        try:
            caption = first.decode("utf-8")
        except UnicodeDecodeError as err:
            yield SourceRecord(f"{txt}:1", str(png), shown(first), category, "tuxpaint", problem=INVALID_UTF8,
                               detail=f"byte {err.start} of the description is not UTF-8")
            continue
        yield SourceRecord(f"{txt}:1", str(png), caption, category, "tuxpaint")


# ---------------------------------------------------------------- folder
@dataclass(frozen=True)
class _Row:
    number: int                     # line number in the captions file
    fields: dict[str, Any] | None   # None when the line could not be read
    problem: str | None = None
    detail: str = ""


def _lines(handle, limit: int) -> Iterator[tuple[bytes, int]]:
    """(line, its full length in bytes) of a binary file, each line cut to ``limit + 1`` bytes: the rest
    of a longer line is read past in chunks, never held."""
    while raw := handle.readline(limit + 1):
        length = len(raw)
        if length > limit and not raw.endswith(b"\n"):
            while chunk := handle.readline(limit):
                length += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        yield raw, length


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    """Each line decoded and parsed on its own: one bad line never hides the others."""
    with path.open("rb") as handle:
        for number, (raw, length) in enumerate(_lines(handle, MAX_LINE_BYTES), start=1):
            if length > MAX_LINE_BYTES:
                yield _Row(number, None, LINE_TOO_LONG,
                           f"{length} bytes, more than {MAX_LINE_BYTES}; starts {shown(raw[:80])}")
                continue
            line = raw.rstrip(b"\r\n")
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield _Row(number, None, INVALID_UTF8, f"byte {err.start} is not UTF-8: {shown(line)}")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                yield _Row(number, None, INVALID_JSON, f"{err.msg} at column {err.colno}: {shown(text)}")
                continue
            if not isinstance(row, dict):
                yield _Row(number, None, INVALID_JSON,
                           f'expected an object like {{"image": ..., "caption": ...}}, got {shown(text)}')
                continue
            yield _Row(number, row)


def _csv_rows(path: Path) -> Iterator[_Row]:
    """Rows of a CSV with a header naming ``image`` and ``caption`` (and optionally ``category``).

    Undecodable bytes are kept as surrogates (``surrogateescape``) so that the row holding them,
    and only that row, is reported as ``invalid_utf8``.
    """
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if "image" not in header or "caption" not in header:
            raise SourceError(f"{path}: the first line must be a header naming the columns image,caption"
                              f"[,category]; found {shown(','.join(header)) or 'nothing'}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield _Row(reader.line_num, None, INVALID_CSV, f"{err}; quote fields holding commas or quotes")
                continue
            number = reader.line_num
            values = [v for k, v in row.items() if k is not None and isinstance(v, str)] + list(row.get(None) or [])
            if any(has_surrogates(v) for v in values):
                yield _Row(number, None, INVALID_UTF8,
                           f"not UTF-8: {shown(','.join(values))}; save the file as UTF-8")
            elif None in row:
                yield _Row(number, None, INVALID_CSV,
                           f"{len(header) + len(row[None])} fields, the header has {len(header)}; quote fields "
                           "holding commas")
            else:
                yield _Row(number, {k: v for k, v in row.items() if v is not None})


def _records_from_row(row: dict[str, Any], origin: str, root: Path, category: str,
                      source: str) -> list[SourceRecord]:
    image = row.get("image")
    category = row.get("category") if isinstance(row.get("category"), str) and row.get("category") else category
    if not isinstance(image, str) or not image.strip():
        return [SourceRecord(origin, "", "", category, source, problem=MISSING_FIELD,
                             detail=f"no 'image' (the image path relative to {root})")]
    captions = row.get("captions") if row.get("captions") is not None else row.get("caption")
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions:
        return [SourceRecord(origin, image, "", category, source, problem=MISSING_FIELD,
                             detail=f"no 'caption' (or 'captions': [...]) for image {image!r}")]
    origins = [origin] if len(captions) == 1 else [f"{origin} caption {n}" for n in range(1, len(captions) + 1)]
    return list(caption_records(root, image, zip(origins, captions), category=category, source=source))


def iter_folder(root: str | Path, source: str | None = None) -> Iterator[SourceRecord]:
    """Read one folder batch: images plus ``captions.jsonl`` or ``captions.csv``."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: folder not found; set dataset.root to the folder holding the images and "
                          f"{' or '.join(CAPTION_FILES)}")
    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not found:
        raise SourceError(f"{root}: no captions file; add {' or '.join(CAPTION_FILES)} beside the images")
    if len(found) > 1:
        log.warning("%s: both %s; reading only %s", root, " and ".join(CAPTION_FILES), found[0].name)
    captions_file = found[0]
    source = source or root.name
    rows = _jsonl_rows(captions_file) if captions_file.suffix == ".jsonl" else _csv_rows(captions_file)
    for row in rows:
        origin = f"{captions_file}:{row.number}"
        if row.fields is None:
            yield SourceRecord(origin, "", "", root.name, source, problem=row.problem, detail=row.detail)
        else:
            yield from _records_from_row(row.fields, origin, root, root.name, source)


def batch_source(batch: str) -> str:
    """The ``source`` of a user batch's rows in the manifest."""
    return f"batch:{batch}"


def iter_batches(batches_dir: str | Path) -> Iterator[SourceRecord]:
    """Every user batch under ``batches_dir``: the folder itself and each sub-folder with a captions file.
    Hidden sub-folders are not batches: ``clipcap add-batch`` copies into ``.<name>.partial`` and renames it
    when the copy is whole, so a run reading the folder meanwhile never sees half a batch."""
    batches_dir = Path(batches_dir)
    if not batches_dir.is_dir():
        return
    folders = [batches_dir, *sorted(p for p in batches_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for folder in folders:
        if any((folder / name).is_file() for name in CAPTION_FILES):
            yield from iter_folder(folder, source=batch_source(folder.name))

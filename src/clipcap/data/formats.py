"""Annotation-file sources: the Karpathy split files and the nocaps validation annotations.

- ``karpathy``: ``dataset_coco.json`` / ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``::

      {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_....jpg",
        "split": "train" | "val" | "test" | "restval", "sentences": [{"raw": "A man ...", ...}], ...}]}

  The image is ``root / filepath / filename`` (Flickr: ``root / filename``). The dataset's own
  split is kept (``restval`` counts as train) instead of the seeded hash split.
- ``nocaps``: the COCO-style validation annotations::

      {"images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain", ...}],
       "annotations": [{"image_id": 0, "caption": "A man ...", "id": 0}, ...]}

  Every image is evaluation data (split ``test``); its ``domain`` (in-, near-, out-domain) is
  kept as a manifest column so evaluation can score each.

A malformed entry becomes a record with a ``problem`` (quarantined by the validate stage); a
file that is missing or not JSON of the expected shape is a :class:`SourceError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clipcap.data.sources import BAD_SPLIT, MISSING_FIELD, SourceError, SourceRecord, caption_records, shown

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def load_annotations(path: str | Path, fmt: str) -> dict[str, Any]:
    """The parsed JSON object at ``path`` (a :class:`SourceError` naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: {fmt} annotations file not found; set dataset.annotations to it "
                          "(or dataset.annotations_url to download it)")
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: not UTF-8 text (byte {err.start}); is it the {fmt} JSON file?") from err
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); "
                          f"the file may be truncated: download it again") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{path}: not a {fmt} annotations file (expected an object with an 'images' list)")
    return data


def iter_karpathy(annotations: str | Path, roots: Sequence[Path], limit: int | None = None) -> Iterator[SourceRecord]:
    """One record per sentence of each image, in file order; ``limit`` keeps the first N images."""
    annotations = Path(annotations)
    data = load_annotations(annotations, "Karpathy split (dataset_coco.json format)")
    name = str(data.get("dataset") or annotations.stem)
    source = f"karpathy:{name}"
    for index, entry in enumerate(data["images"][:limit] if limit else data["images"]):
        origin = f"{annotations.name}:images[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
            yield SourceRecord(origin, "", "", name, source, problem=MISSING_FIELD,
                               detail=f"no 'filename' in {shown(repr(entry))}")
            continue
        filepath = entry.get("filepath")
        relative = f"{filepath}/{entry['filename']}" if isinstance(filepath, str) and filepath else entry["filename"]
        split = KARPATHY_SPLITS.get(entry.get("split"))  # type: ignore[arg-type]
        if split is None:
            yield SourceRecord(origin, relative, "", name, source, problem=BAD_SPLIT,
                               detail=f"split {entry.get('split')!r} is not one of {', '.join(KARPATHY_SPLITS)}")
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            yield SourceRecord(origin, relative, "", name, source, split=split, problem=MISSING_FIELD,
                               detail="no 'sentences'")
            continue
        captions = ((f"{origin}.sentences[{number}]", sentence.get("raw") if isinstance(sentence, dict) else sentence)
                    for number, sentence in enumerate(sentences))
        yield from caption_records(roots, relative, captions, category=name, source=source, split=split)


def iter_nocaps(annotations: str | Path, roots: Sequence[Path], limit: int | None = None) -> Iterator[SourceRecord]:
    """One record per caption, images in file order, all in split ``test`` with their ``domain``."""
    annotations = Path(annotations)
    data = load_annotations(annotations, "nocaps (COCO-style)")
    if not isinstance(data.get("annotations"), list):
        raise SourceError(f"{annotations}: not a nocaps annotations file (expected an 'annotations' list)")
    source = "nocaps"
    captions: dict[Any, list[tuple[int, Any]]] = {}
    for index, item in enumerate(data["annotations"]):
        key = item.get("image_id") if isinstance(item, dict) else None
        captions.setdefault(key, []).append((index, item.get("caption") if isinstance(item, dict) else None))
    known: set[Any] = set()
    for index, entry in enumerate(data["images"][:limit] if limit else data["images"]):
        origin = f"{annotations.name}:images[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "id" not in entry:
            yield SourceRecord(origin, "", "", "nocaps", source, split="test", problem=MISSING_FIELD,
                               detail=f"no 'id' or 'file_name' in {shown(repr(entry))}")
            continue
        known.add(entry["id"])
        domain = entry.get("domain") if isinstance(entry.get("domain"), str) else None
        category = domain or "nocaps"
        found = captions.get(entry["id"], [])
        if not found:
            yield SourceRecord(origin, entry["file_name"], "", category, source, split="test", domain=domain,
                               problem=MISSING_FIELD, detail=f"no caption for image id {entry['id']}")
            continue
        numbered = ((f"{annotations.name}:annotations[{number}]", caption) for number, caption in found)
        yield from caption_records(roots, entry["file_name"], numbered, category=category, source=source,
                                   split="test", domain=domain)
    if limit is None:  # captions of images the file does not list cannot be used: report them
        for key, found in captions.items():
            if key not in known:
                for number, caption in found:
                    yield SourceRecord(f"{annotations.name}:annotations[{number}]", "",
                                       caption if isinstance(caption, str) else "", "nocaps", source, split="test",
                                       problem=MISSING_FIELD, detail=f"image_id {key!r} is not in 'images'")

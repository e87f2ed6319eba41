"""The manifest: one row per distinct image, keyed by its content hash.

Columns: ``image_id`` (sha256 of the file's bytes, so the same picture is one item however
often it is listed), ``path``, ``captions`` (list), ``category``, ``source``, ``split``.

The split is a pure function of (seed, image_id): adding data never moves an existing
image between train, val and test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from clipcap.config import ConfigError, DatasetConfig, SplitConfig
from clipcap.data.sources import CaptionedImage, iter_batches, iter_folder, iter_tuxpaint
from clipcap.fileio import file_sha256, write_atomic

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["image_id", "path", "captions", "category", "source", "split"]


def assign_split(image_id: str, cfg: SplitConfig) -> str:
    """Deterministic split from a seeded hash of the image id."""
    digest = hashlib.sha256(f"{cfg.seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def collect_items(cfg: DatasetConfig) -> list[CaptionedImage]:
    """The configured source plus every user batch under ``cfg.batches_dir``."""
    if cfg.source == "tuxpaint":
        items = list(iter_tuxpaint(cfg.root))
    else:
        if not cfg.root:
            raise ConfigError("dataset.root: the 'folder' source needs the folder holding captions.jsonl/csv")
        items = list(iter_folder(cfg.root, source="folder"))
    if cfg.limit is not None:
        items = items[: cfg.limit]
    return items + list(iter_batches(cfg.batches_dir))


def build_manifest(items: Iterable[CaptionedImage], split_cfg: SplitConfig) -> pd.DataFrame:
    """Group items by content hash (captions of identical images are merged) and assign splits.

    A missing image file is kept with an empty id so that validation can name it.
    """
    rows: dict[str, dict] = {}
    for item in items:
        path = Path(item.path)
        image_id = file_sha256(path) if path.is_file() else f"missing:{path}"
        row = rows.get(image_id)
        if row is None:
            rows[image_id] = {
                "image_id": image_id,
                "path": str(path),
                "captions": list(item.captions),
                "category": item.category,
                "source": item.source,
                "split": assign_split(image_id, split_cfg),
            }
        else:
            row["captions"].extend(c for c in item.captions if c not in row["captions"])
    frame = pd.DataFrame(list(rows.values()), columns=MANIFEST_COLUMNS)
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    frame["captions"] = frame["captions"].map(list)
    return frame


def write_manifest(frame: pd.DataFrame, path: str | Path) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))

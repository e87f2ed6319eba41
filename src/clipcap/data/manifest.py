"""The two tables of the data stages.

**Records** (written by ``fetch`` to ``artifacts/<dataset>/raw_manifest.parquet``): one row per input row,
that is per (image, caption) pair read from a source, plus one per row that could not be read.
Columns: ``record`` (where it was read), ``image_id``, ``path``, ``caption``, ``category``,
``source``, ``split``, ``domain``, ``problem`` (a reason code, "" when readable) and ``detail``.

**Manifest** (written by ``validate`` to ``artifacts/<dataset>/manifest.parquet`` from the records that
passed every check): one row per distinct image. Columns: ``image_id`` (sha256 of the file's
bytes, so the same picture is one item however often it is listed), ``path``, ``captions``
(list), ``category``, ``source``, ``split``, ``domain`` (nocaps; null otherwise).

The split is the dataset's own when it has one (Karpathy, nocaps), otherwise a pure function of
(seed, image_id): adding data never moves an existing image between train, val and test.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from clipcap.config import SplitConfig
from clipcap.data.sources import SourceRecord, has_surrogates, shown
from clipcap.fileio import file_sha256, write_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RECORD_COLUMNS = ["record", "image_id", "path", "caption", "category", "source", "split", "domain", "problem",
                  "detail"]
MANIFEST_COLUMNS = ["image_id", "path", "captions", "category", "source", "split", "domain"]
UNREADABLE_FILE = "unreadable_file"
# An image listed in several splits goes to the first of these: a test image never leaks into training.
SPLIT_PRECEDENCE = ("test", "val", "train")


def assign_split(image_id: str, cfg: SplitConfig) -> str:
    """Deterministic split from a seeded hash of the image id."""
    digest = hashlib.sha256(f"{cfg.seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def _printable(text: str | None) -> str:
    """Strings parquet can store (no lone surrogates); they only occur in rows already marked bad."""
    text = text or ""
    return shown(text, limit=len(text) + 1) if has_surrogates(text) else text


def build_records(records: Iterable[SourceRecord], split_cfg: SplitConfig,
                  digests: Mapping[str, str | OSError] | None = None) -> pd.DataFrame:
    """The records table: each image file's digest (its ``image_id``) and split.

    ``digests`` maps paths to their sha256 (or the error reading them), as
    :func:`clipcap.data.digests.image_digests` gives them from its cache; a path it lacks is hashed
    here. A missing image keeps an empty ``image_id`` so that validation can name it; a file that
    cannot be read gets the problem ``unreadable_file``.
    """
    digests = dict(digests or {})
    rows = []
    for record in records:
        row = {k: _printable(v) if isinstance(v, str) else v for k, v in vars(record).items()}
        row["record"] = row.pop("origin")
        row["problem"] = row["problem"] or ""
        image_id = ""
        if not row["problem"] and row["path"]:
            if row["path"] not in digests:
                digests[row["path"]] = _digest(Path(row["path"]))
            found = digests[row["path"]]
            if isinstance(found, OSError):
                row["problem"] = UNREADABLE_FILE
                row["detail"] = f"cannot read {row['path']}: {found.strerror or found}"
            else:
                image_id = found
        row["image_id"] = image_id
        row["split"] = row["split"] or (assign_split(image_id, split_cfg) if image_id else "")
        rows.append(row)
    return pd.DataFrame(rows, columns=RECORD_COLUMNS).astype({"domain": object})


def _digest(path: Path) -> str | OSError:
    try:
        return file_sha256(path) if path.is_file() else ""
    except OSError as err:
        return err


def group_records(records: pd.DataFrame) -> pd.DataFrame:
    """The manifest from good records: one row per image id, its captions in input order.

    Path, category, source and domain are the first record's; an image listed in several splits
    takes the first of :data:`SPLIT_PRECEDENCE` (so a test image is never trained on).
    """
    rank = {split: index for index, split in enumerate(SPLIT_PRECEDENCE)}
    rows: dict[str, dict] = {}
    conflicts = 0
    for record in records.itertuples(index=False):
        row = rows.get(record.image_id)
        domain = record.domain if isinstance(record.domain, str) and record.domain else None
        if row is None:
            rows[record.image_id] = {"image_id": record.image_id, "path": record.path, "captions": [record.caption],
                                     "category": record.category, "source": record.source, "split": record.split,
                                     "domain": domain}
            continue
        row["captions"].append(record.caption)
        row["domain"] = row["domain"] or domain
        if record.split != row["split"]:
            conflicts += 1
            row["split"] = min(row["split"], record.split, key=lambda s: rank.get(s, len(rank)))
    if conflicts:
        log.warning("%d records list an image already seen in another split; each such image goes to the first "
                    "of %s", conflicts, "/".join(SPLIT_PRECEDENCE))
    frame = pd.DataFrame(list(rows.values()), columns=MANIFEST_COLUMNS).astype({"domain": object})
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    frame["captions"] = frame["captions"].map(list)
    return frame


def write_manifest(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a table to parquet atomically: the manifest, or the records table (fetch)."""
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_records(path: str | Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    return frame.astype({"domain": object}).reset_index(drop=True)


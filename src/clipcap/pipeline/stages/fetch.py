"""``clipcap fetch``: read the configured source and the user batches (downloading what params.yaml
names) into the records table, one row per input row, unreadable rows included with their problem.

It runs on every ``dvc repro`` (the source may be any folder: DVC cannot see new files there) and
costs what is new: image digests of unchanged files come from the digest cache. When nothing
changed, the table it writes is byte-identical, so DVC runs nothing after it."""

from __future__ import annotations

import logging

import pandas as pd

from clipcap.config import Config
from clipcap.data.collect import collect_records
from clipcap.data.digests import image_digests
from clipcap.data.manifest import build_records, write_manifest
from clipcap.pipeline.layout import Layout

log = logging.getLogger(__name__)


def run(cfg: Config, layout: Layout | None = None) -> pd.DataFrame:
    layout = layout or Layout.of(cfg.dataset.name)
    found = list(collect_records(cfg.dataset))
    digests = image_digests((r.path for r in found if not r.problem and r.path), cfg.dataset.hash_workers,
                            layout.digest_cache)
    records = build_records(found, cfg.split, digests)
    write_manifest(records, layout.raw_manifest)
    problems = records.loc[records["problem"] != "", "problem"].value_counts().to_dict()
    log.info("fetch: %d input rows, %d image files%s -> %s", len(records), records["path"].nunique(),
             "; unreadable rows: " + ", ".join(f"{k} {v}" for k, v in problems.items()) if problems else "",
             layout.raw_manifest)
    return records

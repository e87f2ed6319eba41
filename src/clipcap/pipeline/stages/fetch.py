"""``clipcap fetch``: read the configured source and the user batches (downloading what params.yaml
names) into the records table, one row per input row, unreadable rows included with their problem."""

from __future__ import annotations

import logging

import pandas as pd

from clipcap.config import Config
from clipcap.data.collect import collect_records
from clipcap.data.manifest import build_records, write_manifest
from clipcap.pipeline.layout import Layout

log = logging.getLogger(__name__)


def run(cfg: Config, layout: Layout = Layout()) -> pd.DataFrame:
    records = build_records(collect_records(cfg.dataset), cfg.split)
    write_manifest(records, layout.raw_manifest)
    problems = records.loc[records["problem"] != "", "problem"].value_counts().to_dict()
    log.info("fetch: %d input rows, %d image files%s -> %s", len(records), records["path"].nunique(),
             "; unreadable rows: " + ", ".join(f"{k} {v}" for k, v in problems.items()) if problems else "",
             layout.raw_manifest)
    return records

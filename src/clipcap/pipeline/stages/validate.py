"""``clipcap validate``: quarantine the bad input rows (one reason each), write the clean manifest and
the reports; fail only when the quarantined fraction exceeds ``validate.max_bad_fraction``."""

from __future__ import annotations

import logging

from clipcap.config import Config
from clipcap.data.manifest import read_records, write_manifest
from clipcap.data.validate import DataValidationError, validate_records, write_quarantine
from clipcap.fileio import write_json, write_text
from clipcap.pipeline.layout import Layout

log = logging.getLogger(__name__)


def run(cfg: Config, layout: Layout | None = None) -> None:
    layout = layout or Layout.of(cfg.dataset.name)
    result = validate_records(read_records(layout.raw_manifest), cfg.validate)
    write_quarantine(result.quarantine, layout.quarantine)
    write_json(layout.validation_report, result.to_dict())
    write_text(layout.validation_markdown, result.to_markdown(layout.quarantine))
    if not result.success:
        layout.manifest.unlink(missing_ok=True)  # later stages must not run on a stale manifest
        raise DataValidationError(result.failure_message(layout.quarantine, layout.validation_markdown))
    write_manifest(result.manifest, layout.manifest)
    counts = result.manifest["split"].value_counts().to_dict()
    log.info("validate: %d clean rows in %d images (%s) -> %s; %d quarantined (%.1f%%%s) -> %s",
             result.clean_records, len(result.manifest), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             layout.manifest, result.quarantined, 100 * result.bad_fraction,
             f": {result.reasons_text()}" if result.quarantined else "", layout.quarantine)

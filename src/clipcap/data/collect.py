"""Every input row of a dataset: the configured source (downloading what params.yaml names), then
the user batches under ``dataset.batches_dir`` (default ``data/<dataset name>``)."""

from __future__ import annotations

from collections.abc import Iterator

from clipcap.config import DatasetConfig
from clipcap.data.formats import iter_karpathy, iter_nocaps
from clipcap.data.openclipart import iter_openclipart
from clipcap.data.remote import dataset_files
from clipcap.data.sources import SourceRecord, iter_batches, iter_folder, iter_tuxpaint, limit_images


def iter_source(cfg: DatasetConfig) -> Iterator[SourceRecord]:
    """The records of the configured source (``dataset.limit`` images at most), downloading what is configured."""
    if cfg.source == "tuxpaint":
        yield from limit_images(iter_tuxpaint(cfg.root), cfg.limit)
    elif cfg.source == "openclipart":
        yield from limit_images(iter_openclipart(cfg.root), cfg.limit)
    elif cfg.source == "folder":
        yield from limit_images(iter_folder(cfg.root or "", source="folder"), cfg.limit)
    else:
        files = dataset_files(cfg)
        reader = iter_karpathy if cfg.source == "karpathy" else iter_nocaps
        yield from reader(files.annotations, files.image_roots, cfg.limit)


def collect_records(cfg: DatasetConfig) -> Iterator[SourceRecord]:
    """The configured source, then every user batch under ``cfg.batches_dir``."""
    yield from iter_source(cfg)
    yield from iter_batches(cfg.batches)

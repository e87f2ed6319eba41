"""The local files of an annotated dataset: configured paths, or downloads into the cache.

With ``dataset.annotations_url`` / ``dataset.images_url`` set, the fetch stage downloads them
(resumable, checksum-verified: :mod:`clipcap.data.download`) into
``$CLIPCAP_CACHE/downloads/<hash of the URL>/`` and extracts archives beside them, once: a
second run finds them there. Without URLs, ``dataset.annotations`` and ``dataset.root`` must
name local files.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from clipcap.config import DatasetConfig
from clipcap.data.sources import SourceError
from clipcap.environment import cache_dir

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".zip", ".tar")


@dataclass(frozen=True)
class DatasetFiles:
    annotations: Path
    image_roots: tuple[Path, ...]


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def _file_name(url: str) -> str:
    return Path(unquote(urlparse(url).path)).name or "download"


def _is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def _extracted_name(name: str) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return f"{name}.extracted"


def materialise(url: str, sha256: str | None, key: str) -> Path:
    """The downloaded file for ``url``, or the folder it was extracted into when it is an archive."""
    from clipcap.data.download import download, extract  # imported here: only fetches with a URL need it

    folder = downloads_dir() / hashlib.sha256(url.encode()).hexdigest()[:12]
    target = folder / _file_name(url)
    log.info("dataset.%s: %s -> %s", key, url, target)
    path = download(url, target, sha256)
    if _is_archive(path):
        return extract(path, folder / _extracted_name(path.name))
    return path


def _member(folder: Path, name: str, key: str) -> Path:
    """``name`` inside an extracted archive: at that relative path, or the one file of that name anywhere in it."""
    direct = folder / name
    if direct.is_file():
        return direct
    matches = sorted(p for p in folder.rglob(Path(name).name) if p.is_file())
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(str(p.relative_to(folder)) for p in sorted(folder.rglob("*.json"))[:10]) or "no .json files"
    raise SourceError(f"dataset.annotations: {name!r} is {'ambiguous' if matches else 'not'} in the archive from "
                      f"dataset.{key} (extracted to {folder}; it holds {listing}); set dataset.annotations to one "
                      "of those paths")


def dataset_files(cfg: DatasetConfig) -> DatasetFiles:
    """The annotations file and image folders of a ``karpathy`` or ``nocaps`` dataset, downloading what is configured."""
    if cfg.annotations_url:
        fetched = materialise(cfg.annotations_url, cfg.annotations_sha256, "annotations_url")
        if fetched.is_dir():
            if not cfg.annotations:
                raise SourceError(f"dataset.annotations: dataset.annotations_url is an archive (extracted to "
                                  f"{fetched}); name the annotations file inside it, e.g. dataset_coco.json")
            annotations = _member(fetched, cfg.annotations, "annotations_url")
        else:
            annotations = fetched
            if cfg.annotations and Path(cfg.annotations).name != fetched.name:
                log.warning("dataset.annotations=%s ignored: dataset.annotations_url gives the file itself (%s)",
                            cfg.annotations, fetched)
    else:
        annotations = Path(cfg.annotations or "")
        if not annotations.is_file():
            raise SourceError(f"dataset.annotations: {annotations} not found; point it at the {cfg.source} "
                              "annotations JSON, or set dataset.annotations_url to download it")
    if cfg.image_urls:
        roots = []
        for url, digest in zip(cfg.image_urls, cfg.image_sha256s):
            fetched = materialise(url, digest, "images_url")
            if not fetched.is_dir():
                raise SourceError(f"dataset.images_url: {url} is not a zip or tar archive of images; give an "
                                  "archive URL, or download the images yourself and set dataset.root")
            roots.append(fetched)
        return DatasetFiles(annotations, tuple(roots))
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise SourceError(f"dataset.root: {root} is not a folder; point it at the folder holding the images "
                          "(for COCO the one with train2014/ and val2014/), or set dataset.images_url to download them")
    return DatasetFiles(annotations, (root,))

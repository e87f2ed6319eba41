"""Extend a retrieval-augmented captioner's datastore with newly captioned images, without
retraining: ``clipcap datastore add FOLDER --model artifacts/<dataset>/model``.

The folder is read like a user batch (images + ``captions.jsonl``/``captions.csv``) and checked
like one (the rows ``validate`` would quarantine are skipped, with their reasons); the clean
images are embedded with the captioner's own encoder and their captions appended.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from clipcap.config import SplitConfig, ValidateConfig
from clipcap.data.manifest import build_records
from clipcap.data.sources import iter_folder
from clipcap.data.validate import validate_records
from clipcap.errors import ClipcapError
from clipcap.modeling.captioner import Captioner, record_files
from clipcap.modeling.retrieval import CAPTIONS_FILE, EMBEDDINGS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatastoreUpdate:
    added: int          # new (image, caption) entries
    already_there: int  # entries the datastore held
    skipped: dict       # quarantined rows by reason
    size: int           # entries after the update


def extend_datastore(model_dir: str | Path, folder: str | Path, cfg: ValidateConfig = ValidateConfig()) -> DatastoreUpdate:
    captioner = Captioner.load(model_dir)
    if captioner.retriever is None:
        raise ClipcapError(f"{model_dir}: this captioner does not retrieve (trained with retrieval.k: 0), so it has "
                           "no datastore to extend; train one with retrieval.k > 0")
    result = validate_records(build_records(iter_folder(folder), SplitConfig()), cfg)
    clean = result.manifest
    if clean.empty:
        raise ClipcapError(f"{folder}: no usable captioned image ({result.reasons_text()}); nothing was added")
    embeddings = captioner.embed(clean["path"].tolist())
    before = captioner.retriever.datastore
    after = before.add_images(embeddings, clean["captions"], clean["image_id"])
    after.save(model_dir)
    record_files(model_dir, EMBEDDINGS_FILE, CAPTIONS_FILE)
    offered = sum(len(c) for c in clean["captions"])
    update = DatastoreUpdate(len(after) - len(before), offered - (len(after) - len(before)),
                             result.reason_counts, len(after))
    log.info("datastore of %s: %d entries added, %d already there, %d rows skipped (%s); %d entries now",
             model_dir, update.added, update.already_there, result.quarantined, result.reasons_text(), update.size)
    return update

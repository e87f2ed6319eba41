"""``clipcap add-batch DATASET FOLDER``: check a folder of newly captioned images, add it to the
dataset's batches (``data/<dataset>/<batch>/``), record it with ``dvc add data`` and announce it.

The folder is read and checked as the validate stage will read it (images + ``captions.jsonl`` or
``captions.csv``): a batch whose share of bad rows exceeds ``validate.max_bad_fraction`` is refused
with every bad row named, and nothing is copied. A batch is copied whole to a temporary sibling and
renamed, so a failure leaves no half batch behind. The announcement is a Prefect event,
``clipcap.batch.added`` about the resource ``clipcap.dataset.<dataset>``, sent through Prefect's own
command line when ``PREFECT_API_URL`` names a server: a deployment triggered by it retrains now; without
a server the next scheduled run finds the batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from clipcap.config import Config, SplitConfig
from clipcap.data.manifest import build_records
from clipcap.data.sources import iter_folder
from clipcap.data.validate import validate_records
from clipcap.errors import ClipcapError
from clipcap.pipeline import dvc_project

log = logging.getLogger(__name__)
EVENT = "clipcap.batch.added"
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def dataset_resource(dataset: str) -> str:
    """The Prefect resource id events about ``dataset`` name (what its deployment's trigger matches)."""
    return f"clipcap.dataset.{dataset}"


@dataclass(frozen=True)
class BatchAdded:
    dataset: str
    name: str
    path: Path                 # data/<dataset>/<name>
    images: int                # clean images in the batch
    quarantined: dict = field(default_factory=dict)  # rows validate will quarantine, by reason
    tracked: bool = False      # recorded in data.dvc
    announced: bool = False    # the Prefect event was sent


def check_batch(folder: Path, cfg: Config):
    """The batch's rows checked as the validate stage checks them; raises when it would fail it."""
    result = validate_records(build_records(iter_folder(folder), SplitConfig()), cfg.validate)
    if result.manifest.empty or not result.success:
        bad = result.quarantine.head(10)
        rows = "\n".join(f"  {row.record}: {row.reason}: {row.detail}" for row in bad.itertuples())
        more = f"\n  ... and {len(result.quarantine) - len(bad)} more" if len(result.quarantine) > len(bad) else ""
        raise ClipcapError(f"{folder}: {result.quarantined} of {result.quarantined + result.clean_records} rows "
                           f"are unusable ({result.reasons_text()}), more than validate.max_bad_fraction="
                           f"{cfg.validate.max_bad_fraction}; fix or remove them and add the batch again "
                           f"(nothing was added):\n{rows}{more}")
    return result


def copy_batch(folder: Path, destination: Path) -> None:
    """Copy ``folder`` to ``destination`` whole or not at all (a temporary sibling, then a rename)."""
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(folder, partial)
        partial.rename(destination)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def announce(dataset: str, batch: str, images: int) -> bool:
    """Send ``clipcap.batch.added`` for ``dataset`` to the Prefect server at ``PREFECT_API_URL``
    (``prefect event emit``); False when none is configured."""
    if not os.environ.get("PREFECT_API_URL"):
        log.info("PREFECT_API_URL is not set: no event sent; the next scheduled run of %s finds the batch", dataset)
        return False
    payload = json.dumps({"dataset": dataset, "batch": batch, "images": images})
    done = subprocess.run(["prefect", "event", "emit", EVENT, "--resource-id", dataset_resource(dataset),
                           "--payload", payload], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClipcapError(f"the batch was added, but the event could not be sent to {os.environ['PREFECT_API_URL']} "
                           f"(exit {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}; the next "
                           f"scheduled run finds it, or send it again with: prefect event emit {EVENT} "
                           f"--resource-id {dataset_resource(dataset)}")
    return True


def add_batch(cfg: Config, folder: str | Path, project: Path = Path("."), name: str | None = None,
              send_event: bool = True) -> BatchAdded:
    """Check ``folder``, copy it to ``<dataset.batches_dir>/<name>``, ``dvc add data`` when the project is
    a DVC project, and announce it."""
    folder = Path(folder)
    name = name or folder.resolve().name
    if not BATCH_NAME.match(name):
        raise ClipcapError(f"batch name {name!r}: use letters, digits, '.', '-' and '_' (pass --name)")
    destination = project / cfg.dataset.batches / name
    if destination.exists():
        raise ClipcapError(f"{destination} already exists: a batch is added once; pass another --name to add more")
    result = check_batch(folder, cfg)
    destination.parent.mkdir(parents=True, exist_ok=True)
    copy_batch(folder, destination)
    images = len(result.manifest)
    log.info("%s: batch %s added to %s (%d images; %s)", cfg.dataset.name, name, destination, images,
             f"{result.quarantined} rows validate will quarantine: {result.reasons_text()}"
             if result.quarantined else "no bad rows")
    tracked = dvc_project.is_dvc_project(project) and (project / "data.dvc").exists()
    if tracked:
        dvc_project.dvc(["add", "-q", "data"], project)
    announced = announce(cfg.dataset.name, name, images) if send_event else False
    return BatchAdded(cfg.dataset.name, name, destination, images, result.reason_counts, tracked, announced)

"""``clipcap add-batch DATASET FOLDER``: check a folder of newly captioned images, add it to the
dataset's batches (``data/<dataset>/<batch>/``), record it with ``dvc add data`` and announce it.

The folder is read and checked as the validate stage will read it (images + ``captions.jsonl`` or
``captions.csv``): a batch whose share of bad rows exceeds ``validate.max_bad_fraction`` is refused
with every bad row named, and nothing is copied. A batch is copied whole to a temporary sibling and
renamed, so a failure leaves no half batch behind, and nothing already under ``data/`` is touched.

Links and special files: the folder is walked without following any link, so a link never takes the
copy out of the folder or round a loop. A symbolic link to a regular file inside the folder is
accepted and copied as a file (its content, under the link's name: the batch then reads the same
under ``data/``). Every other link is refused, each named with its reason: one pointing outside the
folder (``photos/x.png: a symbolic link to /etc/passwd, outside the batch folder``), to a folder
(inside or not: it would copy a tree twice, or loop), to nothing, or round a loop; so is anything
that is not a regular file or folder (a FIFO, socket or device). The batch is refused whole then,
before anything is read or copied. The announcement is a Prefect event,
``clipcap.batch.added`` about the resource ``clipcap.dataset.<dataset>``, sent through Prefect's own
command line when ``PREFECT_API_URL`` names a server: a deployment triggered by it retrains now; without
a server the next scheduled run finds the batch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from clipcap.config import Config
from clipcap.data.manifest import build_records
from clipcap.data.sources import batch_source, iter_folder
from clipcap.data.validate import validate_records
from clipcap.errors import ClipcapError
from clipcap.pipeline import dvc_project

log = logging.getLogger(__name__)
EVENT = "clipcap.batch.added"
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def images_of_batch(manifest: Path, batch: str) -> int:
    """How many of the clean manifest's images came in ``batch``: what a model trained on it saw of the batch."""
    import pandas as pd

    if not Path(manifest).exists():
        return 0
    return int((pd.read_parquet(manifest, columns=["source"])["source"] == batch_source(batch)).sum())


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
    result = validate_records(build_records(iter_folder(folder), cfg.split), cfg.validate)
    if result.manifest.empty or not result.success:
        bad = result.quarantine.head(10)
        rows = "\n".join(f"  {row.record}: {row.reason}: {row.detail}" for row in bad.itertuples())
        more = f"\n  ... and {len(result.quarantine) - len(bad)} more" if len(result.quarantine) > len(bad) else ""
        raise ClipcapError(f"{folder}: {result.quarantined} of {result.quarantined + result.clean_records} rows "
                           f"are unusable ({result.reasons_text()}), more than validate.max_bad_fraction="
                           f"{cfg.validate.max_bad_fraction}; fix or remove them and add the batch again "
                           f"(nothing was added):\n{rows}{more}")
    return result


def _link_problem(link: Path, root: Path) -> str | None:
    """Why the symbolic link ``link`` (in the batch folder ``root``, resolved) cannot be copied; None when
    it names a regular file inside ``root``."""
    target = os.readlink(link)
    try:
        real = link.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 raises this for a loop
        return f"a symbolic link to {target} that loops back on itself; replace it with the file it should name"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"a symbolic link to {target} that loops back on itself; replace it with the file it should name"
        return f"a symbolic link to {target}, which does not exist; remove it or copy the file in instead"
    if not real.is_relative_to(root):
        return f"a symbolic link to {real}, outside the batch folder; copy the file in instead"
    if real.is_dir():
        return f"a symbolic link to the folder {target}; copy the files in instead (or remove the link)"
    if not real.is_file():
        return f"a symbolic link to {real}, which is not a regular file; remove it"
    return None


def _entries(folder: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """((source, relative path) of every file to copy, problems): ``folder`` walked without following links."""
    root = folder.resolve()
    files: list[tuple[Path, Path]] = []
    problems: list[str] = []
    for top, dirs, names in os.walk(root, followlinks=False, onerror=lambda err: problems.append(
            f"{err.filename}: cannot be read ({err.strerror}); fix its permissions")):
        top_path = Path(top)
        linked = [d for d in dirs if (top_path / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in linked)  # os.walk lists a link to a folder among dirs
        for name in sorted([*names, *linked]):
            path = top_path / name
            relative = path.relative_to(root)
            shown_name = f"{folder.name}/{relative}"
            if path.is_symlink():
                why = _link_problem(path, root)
            else:
                kind = path.lstat().st_mode
                why = None if stat.S_ISREG(kind) else "not a regular file (a FIFO, socket or device); remove it"
            if why:
                problems.append(f"{shown_name}: {why}")
            else:
                files.append((path, relative))
    return files, problems


def check_links(folder: Path) -> list[tuple[Path, Path]]:
    """The files ``copy_batch`` will copy; raises naming every link or special file it will not
    (see the module's docstring)."""
    if not folder.is_dir():
        return []  # check_batch says what is missing
    files, problems = _entries(folder)
    if len(problems) == 1:
        raise ClipcapError(f"{problems[0]} (nothing was added)")
    if problems:
        shown_rows = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ClipcapError(f"{folder}: {len(problems)} items cannot be added (nothing was added):\n{shown_rows}{more}")
    return files


def copy_batch(folder: Path, destination: Path, files: list[tuple[Path, Path]]) -> None:
    """Copy ``files`` (what :func:`check_links` found in ``folder``) to ``destination`` whole or not at all
    (a temporary sibling, then a rename), following no link out of it; a link to a file inside is copied as
    that file, and a link changed since it was checked is refused."""
    root = folder.resolve()
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        for source, relative in files:
            if source.is_symlink() and (why := _link_problem(source, root)):  # changed since it was checked
                raise ClipcapError(f"{folder.name}/{relative}: {why} (nothing was added)")
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.resolve(), target)
        partial.rename(destination)
    except OSError as err:
        raise ClipcapError(f"{destination}: copying the batch failed ({err.strerror or err}: {err.filename}); "
                           "nothing was added: free space there (or fix the permissions) and add it again") from err
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
    files = check_links(folder)  # before anything is read: the captions file itself may be a link out
    result = check_batch(folder, cfg)
    destination.parent.mkdir(parents=True, exist_ok=True)
    copy_batch(folder, destination, files)
    images = len(result.manifest)
    log.info("%s: batch %s added to %s (%d images; %s)", cfg.dataset.name, name, destination, images,
             f"{result.quarantined} rows validate will quarantine: {result.reasons_text()}"
             if result.quarantined else "no bad rows")
    tracked = dvc_project.is_dvc_project(project) and (project / "data.dvc").exists()
    if tracked:
        dvc_project.dvc(["add", "-q", "data"], project)
    announced = announce(cfg.dataset.name, name, images) if send_event else False
    return BatchAdded(cfg.dataset.name, name, destination, images, result.reason_counts, tracked, announced)

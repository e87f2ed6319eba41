"""The project as DVC sees it, through DVC's own command line (never ``import dvc``): the verbs that
change the project (``clipcap add-batch``, ``clipcap models restore``) and the retraining flows run
their ``dvc`` commands here.

DVC takes one lock per repository for the whole of a command and fails at once ("is busy") when another
holds it, so two ``dvc repro`` runs never overlap, whatever datasets they reproduce. Two locks of ours
replace it for retraining:
- :func:`project_lock`, taken by every ``dvc`` command run here, and held only as long as the command:
  a run of one dataset, a run of another and a user adding a batch wait for each other, never fail;
- :func:`dataset_lock`, held by a retraining run for its whole length: two runs of one dataset never
  overlap, runs of different datasets do.
:func:`reproduce` runs one stage the way ``dvc repro --single-item`` does, but with its command (the
long part: encoding, training, evaluation) outside the project lock: DVC names the command if the
stage is out of date, the command runs, ``dvc commit`` records its outputs in ``dvc.lock`` and the cache.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from clipcap.errors import ClipcapError
from clipcap.fileio import write_text

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 6 * 3600  # a full retrain of a large dataset holds the lock for its longest stage


class DvcError(ClipcapError, RuntimeError):
    """A ``dvc`` command failed; the message holds its last lines of output."""


def is_dvc_project(project: Path) -> bool:
    return (project / ".dvc").is_dir()


@contextmanager
def _held(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold the file lock at ``path`` (``what`` it guards, for the log and the error), waiting for its holder."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0.05)
    except Timeout:
        log.info("waiting for %s (lock %s)", what, path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout as err:
            raise DvcError(f"{path} has been held for {timeout:.0f} s by {what}; if none runs, delete that file") from err
    try:
        yield
    finally:
        lock.release()


def project_lock(project: Path, timeout: float = LOCK_TIMEOUT_S):
    """Hold the project's command lock (``.dvc/tmp/clipcap.lock``) for one ``dvc`` command."""
    return _held(project / ".dvc" / "tmp" / "clipcap.lock", f"another DVC command in {project}", timeout)


def dataset_lock(project: Path, dataset: str, timeout: float = LOCK_TIMEOUT_S):
    """Hold ``dataset``'s lock (``.dvc/tmp/clipcap-<dataset>.lock``) for a whole retraining run."""
    return _held(project / ".dvc" / "tmp" / f"clipcap-{dataset}.lock", f"another retraining run of {dataset}", timeout)


def _stream(args: list[str] | str, project: Path, echo: Callable[[str], None] | None) -> tuple[int, list[str]]:
    """Run ``args`` (a shell line when a string) in ``project``: its exit status and output lines, each
    passed to ``echo`` as it comes."""
    process = subprocess.Popen(args, cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               shell=isinstance(args, str))
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        lines.append(line)
        if echo and line and "\r" not in line:  # progress bars redraw with \r: keep the log readable
            echo(line)
    return process.wait(), lines


def dvc(args: list[str], project: Path, echo: Callable[[str], None] | None = None) -> str:
    """Run ``dvc <args>`` in ``project`` under the project lock; its output, each line passed to ``echo``
    as it comes. Raises :class:`DvcError` (with the output's tail) when it fails."""
    with project_lock(project):
        status, lines = _stream(["dvc", *args], project, echo)
    if status != 0:
        tail = "\n".join(lines[-40:])
        raise DvcError(f"'dvc {' '.join(args)}' failed in {project} (exit {status}):\n{tail}")
    return "\n".join(lines)


def stage_commands(project: Path, stage: str) -> list[str]:
    """The command lines DVC would run for ``stage`` (``dvc repro --dry --single-item``), none when it is
    up to date. Its dependencies must exist: reproduce the stages before it first."""
    out = dvc(["repro", "--dry", "--single-item", stage], project)
    return [line[2:] for line in out.splitlines() if line.startswith("> ")]


def reproduce(project: Path, stage: str, echo: Callable[[str], None] | None = None) -> bool:
    """``dvc repro --single-item stage``, with the stage's command run outside the project lock (DVC's
    commands inside it): the stages of other datasets, and their ``dvc`` commands, run meanwhile. Hold
    the stage's :func:`dataset_lock` around it. False when the stage was up to date (nothing ran)."""
    commands = stage_commands(project, stage)
    for command in commands:
        if echo:
            echo(f"> {command}")
        status, lines = _stream(command, project, echo)
        if status != 0:
            tail = "\n".join(lines[-40:])
            raise DvcError(f"stage {stage} failed in {project}: '{command}' exited {status}:\n{tail}")
    if commands:
        dvc(["commit", "--force", "--quiet", stage], project, echo)   # outputs to the cache, dvc.lock updated
    return bool(commands)


BATCHES_README = "README.md"


def batches_readme(dataset: str) -> str:
    """The text of ``data/<dataset>/README.md``: the same bytes for a dataset wherever it is written, so
    projects (and a committed ``data.dvc``) that record it agree."""
    return (f"# New batches of the dataset {dataset}\n\n"
            f"One folder per batch here, data/{dataset}/<batch>/: images and a captions.jsonl or captions.csv.\n"
            f"Then `dvc add data && dvc repro`, or `clipcap add-batch {dataset} FOLDER` (it checks the batch first).\n\n"
            "This file keeps the folder in data.dvc. The fetch stage depends on the folder, and DVC tracks files,\n"
            "not folders: it removes an empty one when it checks data.dvc out (`dvc exp run` does, first).\n")


def keep_batches_folders(project: Path, datasets: Iterable[str],
                         echo: Callable[[str], None] | None = None) -> list[Path]:
    """Give each dataset's batches folder ``data/<dataset>/`` (the fetch stage's DVC dependency) a README,
    and record the new ones in ``data.dvc`` (``dvc add data``, when the project has one). An empty folder
    is not enough: ``data.dvc`` then records none of it, so ``dvc checkout`` (which ``dvc exp run`` runs
    first) removes it and every stage of the dataset fails with "dependency 'data/<dataset>' does not
    exist". Returns the READMEs written (none when every folder had one)."""
    written = []
    for dataset in datasets:
        path = Path(project) / "data" / dataset / BATCHES_README
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, batches_readme(dataset))
            written.append(path)
    if written and is_dvc_project(Path(project)) and (Path(project) / "data.dvc").exists():
        dvc(["add", "-q", "data"], Path(project), echo)
    return written


def stale(project: Path, target: str) -> dict:
    """``dvc status --json --with-deps target``: what is out of date and why (read from stdout alone, so
    a warning DVC prints on stderr never spoils the JSON)."""
    with project_lock(project):
        done = subprocess.run(["dvc", "status", "--json", "--with-deps", target], cwd=project,
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise DvcError(f"'dvc status {target}' failed in {project} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout or "{}")


def default_remote(project: Path) -> str | None:
    """The name of the project's default DVC remote, None when it has none."""
    done = subprocess.run(["dvc", "remote", "default"], cwd=project, capture_output=True, text=True)
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def stage_names(dataset: str, stages: list[str] | tuple[str, ...]) -> list[str]:
    return [f"{stage}@{dataset}" for stage in stages]


def push(project: Path, dataset: str, stages: list[str] | tuple[str, ...],
         echo: Callable[[str], None] | None = None) -> str | None:
    """Push a dataset's stage outputs and the data they came from to the default remote; the remote's
    name, or None (nothing pushed) when the project has none."""
    remote = default_remote(project)
    if remote is None:
        log.info("no default DVC remote in %s: %s's artifacts were not pushed (dvc remote add -d NAME URL)",
                 project, dataset)
        return None
    dvc(["push", "--with-deps", *stage_names(dataset, stages)], project, echo)
    return remote


def restore_lock(project: Path, dataset: str, entries: dict) -> list[str]:
    """Make ``dvc.lock`` record ``entries`` (``<stage>@<dataset>`` -> entry, as a registered version
    logged them) for ``dataset``, leaving the other datasets' entries as they are; the stages written."""
    stale = [name for name in entries if not name.endswith(f"@{dataset}")]
    if stale:
        raise ClipcapError(f"lock entries {stale} are not stages of dataset {dataset!r}")
    path = project / "dvc.lock"
    lock = yaml.safe_load(path.read_text()) if path.exists() else None
    lock = lock or {"schema": "2.0", "stages": {}}
    stages = {name: entry for name, entry in lock.get("stages", {}).items() if not name.endswith(f"@{dataset}")}
    lock["stages"] = stages | entries
    write_text(path, yaml.safe_dump(lock, sort_keys=False))
    return list(entries)


def pull(project: Path, targets: list[str], echo: Callable[[str], None] | None = None) -> None:
    """``dvc pull`` the outputs ``dvc.lock`` records for ``targets`` (stage names) into the workspace."""
    if default_remote(project) is None:
        raise DvcError(f"{project} has no default DVC remote to pull from: add the one the runs pushed to "
                       "(dvc remote add -d NAME URL; scripts/env.sh sets $CLIPCAP_CACHE/dvc-remote)")
    dvc(["pull", *targets], project, echo)

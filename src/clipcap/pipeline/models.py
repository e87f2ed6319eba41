"""The registry by hand: ``clipcap models list | promote | rollback | restore DATASET [VERSION]``.

Every move of ``champion`` (by the gate or by hand) records on the version who moved it, when and
why, and the version it replaced; ``rollback`` returns to that one (or to a version named).
``restore`` brings a version's pipeline artifacts (``artifacts/<dataset>/``: manifest, embeddings,
model, metrics) back from the DVC remote, by the ``dvc.lock`` entries its run logged.
"""

from __future__ import annotations

import getpass
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml

from mlflow.exceptions import MlflowException

from clipcap.config import RegisterConfig
from clipcap.errors import ClipcapError
from clipcap.pipeline.registry import (
    CHAMPION, EXPERIMENT_TAG, GATE_TAG, LOCK_ARTIFACT, PREVIOUS_TAG, PROMOTION_TAGS, connect, current_champion,
    make_champion, metric_key, model_name, promotion_lock,
)


@dataclass(frozen=True)
class VersionRow:
    version: int
    aliases: tuple[str, ...]
    value: float | None          # the register metric its run logged
    created: str
    experiment: str | None
    decision: str                # the gate's or the last promotion's reason

    def line(self, metric: str) -> str:
        value = "-" if self.value is None else f"{self.value:.4f}"
        tags = ",".join(self.aliases) or "-"
        origin = f"experiment {self.experiment}" if self.experiment else "pipeline"
        return f"{self.version:>7}  {tags:<20}  {metric} {value:>8}  {self.created}  {origin:<24}  {self.decision}"


def who() -> str:
    """The user and host a hand-made change is recorded under."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def list_versions(cfg: RegisterConfig, dataset: str) -> list[VersionRow]:
    """Every version of ``clipcap-<dataset>``, newest first, with its aliases, metric and last decision."""
    from datetime import UTC, datetime

    client = connect(cfg)
    name = model_name(dataset)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        raise ClipcapError(f"{name}: not in the registry at {cfg.tracking_uri}") from err
    rows = []
    for listed in sorted(versions, key=lambda v: -int(v.version)):
        found = client.get_model_version(name, listed.version)  # the search leaves the aliases out
        run = client.get_run(found.run_id)
        tags = found.tags or {}
        why = tags.get(PROMOTION_TAGS[2]) if CHAMPION in found.aliases else None
        rows.append(VersionRow(
            int(found.version), tuple(sorted(found.aliases)), run.data.metrics.get(metric_key(cfg)),
            datetime.fromtimestamp(found.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            tags.get(EXPERIMENT_TAG), why or tags.get(GATE_TAG, "")))
    if not rows:
        raise ClipcapError(f"{name} has no versions in {cfg.tracking_uri}")
    return rows


def _existing(client, name: str, version: int, tracking_uri: str) -> None:
    try:
        client.get_model_version(name, str(version))
    except MlflowException as err:
        raise ClipcapError(f"{name} has no version {version} in {tracking_uri}") from err


def promote(cfg: RegisterConfig, dataset: str, version: int, reason: str = "") -> str:
    """Make ``version`` of ``clipcap-<dataset>`` the champion by hand (under the promotion lock)."""
    client = connect(cfg)
    name = model_name(dataset)
    with promotion_lock(cfg.tracking_uri, name):
        _existing(client, name, version, cfg.tracking_uri)
        before = current_champion(client, cfg, name).version
        why = (f"promoted by hand (champion before: {before if before is not None else 'none'})"
               + (f": {reason}" if reason else ""))
        make_champion(client, name, version, before, who(), why)
        client.set_model_version_tag(name, str(version), GATE_TAG, why)
    return why


def rollback(cfg: RegisterConfig, dataset: str, version: int | None = None, reason: str = "") -> tuple[int, str]:
    """Move ``champion`` back: to ``version``, or to the version the current champion replaced.
    Returns (the new champion, why)."""
    client = connect(cfg)
    name = model_name(dataset)
    with promotion_lock(cfg.tracking_uri, name):
        current = current_champion(client, cfg, name).version
        if current is None:
            raise ClipcapError(f"{name} has no champion to roll back")
        if version is None:
            previous = client.get_model_version(name, str(current)).tags.get(PREVIOUS_TAG)
            if previous is None:
                raise ClipcapError(f"{name} version {current} replaced no earlier champion: name the version to "
                                   f"roll back to (clipcap models rollback {dataset} VERSION)")
            version = int(previous)
        _existing(client, name, version, cfg.tracking_uri)
        why = f"rolled back from version {current} by hand" + (f": {reason}" if reason else "")
        make_champion(client, name, version, None, who(), why)  # keeps its own predecessor: rolling back again
    return version, why                                        # goes further back, never forth


@dataclass(frozen=True)
class Restored:
    version: int
    run_id: str
    stages: list[str]       # the dvc.lock entries written and pulled
    metrics: dict           # the version's logged test metrics (model_*), to compare with a re-evaluation


def restore(cfg: RegisterConfig, dataset: str, version: int, project: Path = Path("."), echo=None) -> Restored:
    """Write the ``dvc.lock`` entries version ``version`` of ``clipcap-<dataset>`` was built from into the
    project's ``dvc.lock`` (the other datasets' entries stay) and ``dvc pull`` their outputs."""
    from clipcap.pipeline import dvc_project

    client = connect(cfg)
    name = model_name(dataset)
    _existing(client, name, version, cfg.tracking_uri)
    run_id = client.get_model_version(name, str(version)).run_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LOCK_ARTIFACT, dst_path=folder)
        except MlflowException as err:
            raise ClipcapError(f"{name} version {version} (run {run_id}) logged no {LOCK_ARTIFACT}: it was not built "
                               "by the DVC pipeline (or by an older clipcap), so there is nothing to pull") from err
        lock = yaml.safe_load(Path(local).read_text()) or {}
    entries = lock.get("stages") or {}
    if not entries:
        raise ClipcapError(f"{name} version {version}: its {LOCK_ARTIFACT} records no stage")
    stages = dvc_project.restore_lock(project, dataset, entries)
    dvc_project.pull(project, stages, echo)
    run = client.get_run(run_id)
    metrics = {key: value for key, value in run.data.metrics.items() if key.startswith("model_")}
    return Restored(version, run_id, stages, metrics)

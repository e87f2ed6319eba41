"""The registry by hand: ``clipcap models list | promote | rollback DATASET [VERSION]``.

Every move of ``champion`` (by the gate or by hand) records on the version who moved it, when and
why, and the version it replaced; ``rollback`` returns to that one (or to a version named).
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from clipcap.config import RegisterConfig
from clipcap.errors import ClipcapError
from clipcap.pipeline.registry import (
    CHAMPION, EXPERIMENT_TAG, GATE_TAG, PREVIOUS_TAG, PROMOTION_TAGS, connect, current_champion,
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

"""The training run in MLflow, live: the train stage opens it when training starts, so the loss and
learning rate of every optimizer step, each epoch's validation loss and CIDEr, and the machine's
system metrics (CPU, memory, GPU) can be watched while it trains; the register stage reopens the same
run (its id is in ``training/summary.json``) to add the test metrics, the files and the model.

Step metrics are sent in batches (every ``FLUSH_STEPS`` steps or ``FLUSH_S`` seconds, and at each
epoch's end), so a fast GPU loop does not wait on the tracking store.

A sqlite tracking store that another process holds locked (a stage or ``mlflow`` writing it) is one
:class:`TrackingStoreLocked` line naming the database and what to do, not SQLAlchemy's traceback
(:mod:`clipcap.pipeline.store_errors`): :func:`clipcap.pipeline.registry.connect`, which every command
opening the store goes through, and the training run here translate it.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from clipcap.config import Config, config_to_dict
from clipcap.pipeline.registry import connect, model_name
from clipcap.pipeline.store_errors import TrackingStoreLocked, store_errors  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
FLUSH_STEPS, FLUSH_S = 20, 5.0
EPOCH_METRICS = ("val_loss", "val_CIDEr")
def run_params(cfg: Config) -> dict[str, str]:
    """Every parameter of the run, flattened (``train.lr``...), and the Python version."""
    params: dict[str, str] = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            params[prefix] = str(value)

    flatten("", config_to_dict(cfg))
    params["host.python"] = platform.python_version()
    return params


class LiveRun:
    """Receives the training loop's step and epoch records and sends them to the run."""

    def __init__(self, client, run_id: str, tracking_uri: str):
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        self._pending: list[Metric] = []
        self._sent = time.monotonic()

    def on_step(self, record: dict) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric("train_loss", float(record["loss"]), now, int(record["step"])),
                          Metric("lr", float(record["lr"]), now, int(record["step"]))]
        if len(self._pending) >= 2 * FLUSH_STEPS or time.monotonic() - self._sent >= FLUSH_S:
            self.flush()

    def on_epoch_end(self, record: dict) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(name, float(record[name]), now, int(record["step"]))
                          for name in EPOCH_METRICS if isinstance(record.get(name), float)]
        self.flush()

    def flush(self) -> None:
        with store_errors(self.tracking_uri):
            for start in range(0, len(self._pending), 1000):  # the store's batch limit
                self.client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
        self._pending, self._sent = [], time.monotonic()

    def describe(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}


@contextmanager
def training_run(cfg: Config, tags: dict[str, str] | None = None) -> Iterator[LiveRun]:
    """Open the dataset's training run (params and tags logged, system metrics sampled) for the length of
    the ``with`` block; it ends FINISHED, or FAILED when the block raises."""
    client = connect(cfg.register)
    with store_errors(cfg.register.tracking_uri):
        run = mlflow.start_run(run_name=f"{model_name(cfg.dataset.name)}-train", log_system_metrics=True, tags=tags)
    live = LiveRun(client, run.info.run_id, cfg.register.tracking_uri)
    log.info("MLflow run %s at %s: loss, learning rate and system metrics live", run.info.run_id,
             cfg.register.tracking_uri)
    try:
        with store_errors(cfg.register.tracking_uri):
            mlflow.log_params(run_params(cfg))
        yield live
        live.flush()
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


def reusable_run(described: dict | None, tracking_uri: str) -> str | None:
    """The id of the training run ``described`` (``summary.json``'s ``mlflow_run``) when it is in the store at
    ``tracking_uri`` and finished; None otherwise (the register stage then opens a run of its own)."""
    if not described or described.get("tracking_uri") != tracking_uri:
        return None
    try:
        with store_errors(tracking_uri):
            run = mlflow.MlflowClient(tracking_uri).get_run(described["run_id"])
    except MlflowException:
        log.warning("training run %s is not in %s: registering under a new run", described.get("run_id"), tracking_uri)
        return None
    return run.info.run_id if run.info.status == "FINISHED" else None

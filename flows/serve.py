"""Serve one retraining deployment per dataset: on its schedule, and at once when new data is announced.

    python flows/serve.py [--project DIR] [--dataset NAME ...] [--interval SECONDS] [--embed-workers N] [--dask ADDRESS]

Each of params.yaml's ``datasets`` gets a deployment ``clipcap-retrain/retrain-<dataset>`` running
``flows/retrain.py``'s flow for it:
- on ``schedule.cron`` (per dataset, like every section; ``--interval`` replaces every schedule, for demos
  and tests);
- when a ``clipcap.batch.added`` event about ``clipcap.dataset.<dataset>`` arrives (``clipcap add-batch``
  sends it), through a deployment trigger;
- one run at a time per dataset: a run due while another is running waits for it (``AwaitingConcurrencySlot``)
  and then usually finds nothing new and skips.

Schedules and triggers need a Prefect server (``prefect server start``, or ``scripts/stack.sh``) named by
``PREFECT_API_URL``. This process runs the flows itself (``serve``); to run them on other machines, deploy
the same flow to a work pool (README: scaling out). Stop it with Ctrl-C: its deployments' schedules pause.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrain import retrain  # noqa: E402  (sets the offline environment first)

from prefect import serve  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402
from prefect.events import DeploymentEventTrigger  # noqa: E402
from prefect.schedules import Cron, Interval  # noqa: E402

from clipcap.config import dataset_names, load_config, read_params  # noqa: E402
from clipcap.pipeline.batches import EVENT, dataset_resource  # noqa: E402


def deployments(project: Path, datasets: list[str], interval: float | None = None, embed_workers: int = 1,
                dask_address: str | None = None) -> list:
    """One deployment of the retraining flow per dataset, with its schedule and its new-data trigger."""
    found = []
    for dataset in datasets:
        cfg = load_config(project / "params.yaml", dataset)
        schedule = Interval(interval) if interval else Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)
        parameters = {"project_dir": str(project), "dataset": dataset, "embed_workers": embed_workers,
                      "dask_address": dask_address}
        found.append(retrain.to_deployment(
            name=f"retrain-{dataset}",
            schedule=schedule,
            parameters=parameters,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            triggers=[DeploymentEventTrigger(
                name=f"new data in {dataset}", expect={EVENT}, match={"prefect.resource.id": dataset_resource(dataset)},
                parameters=parameters)],
            tags=["clipcap", dataset],
            description=f"Keep clipcap-{dataset} fresh: look for new data, retrain, evaluate, gate, register.",
        ))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default=".", help="the clipcap project (default: here)")
    parser.add_argument("--dataset", action="append", help="serve only these datasets (default: all of them)")
    parser.add_argument("--interval", type=float, default=None,
                        help="run every SECONDS instead of each dataset's schedule.cron")
    parser.add_argument("--embed-workers", type=int, default=1,
                        help="parts encoding new images at once (flows/embed_parts.py; default: 1)")
    parser.add_argument("--dask", default=os.environ.get("CLIPCAP_DASK_ADDRESS"),
                        help="run the parts on the Dask cluster at this scheduler address (default: "
                             "$CLIPCAP_DASK_ADDRESS; none: this machine's processes)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        parser.error("PREFECT_API_URL is not set: schedules and triggers need a Prefect server "
                     "(prefect server start, or scripts/stack.sh)")
    project = Path(args.project).resolve()
    datasets = args.dataset or dataset_names(read_params(project / "params.yaml"))
    serve(*deployments(project, datasets, args.interval, args.embed_workers, args.dask))


if __name__ == "__main__":
    main()

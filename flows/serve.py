"""One retraining deployment per dataset: on its schedule, and at once when new data is announced.

    python flows/serve.py [--project DIR] [--dataset NAME ...] [--interval SECONDS] [--parts N] [--dask ADDRESS]
    python flows/serve.py --work-pool NAME [same options]      # deploy to a work pool, then exit

Each of params.yaml's ``datasets`` gets a deployment ``clipcap-retrain/retrain-<dataset>`` running
``flows/retrain.py``'s flow for it:
- on ``schedule.cron`` (per dataset, like every section; ``--interval`` replaces every schedule, for demos
  and tests);
- when a ``clipcap.batch.added`` event about ``clipcap.dataset.<dataset>`` arrives (``clipcap add-batch``
  sends it), through a deployment trigger;
- one run at a time per dataset: a run due while another is running waits for it (``AwaitingConcurrencySlot``)
  and then usually finds nothing new and skips. Runs of different datasets overlap.

Schedules and triggers need a Prefect server (``prefect server start``, or ``scripts/stack.sh``) named by
``PREFECT_API_URL``. Without ``--work-pool`` this process runs the flows itself (``serve``; stop it with
Ctrl-C: its deployments' schedules pause). With ``--work-pool NAME`` the deployments go to that Prefect
work pool (a ``process`` pool, created when missing) and this exits: the pool's workers (``prefect worker
start --pool NAME``, one per machine or more; ``scripts/stack.sh`` starts them) take the runs, each from
this flows folder, which every worker's machine must have at the same path (a shared mount, or a clone).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrain import retrain  # noqa: E402  (sets the offline environment first)

from prefect import deploy, serve  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402
from prefect.events import DeploymentEventTrigger  # noqa: E402
from prefect.schedules import Cron, Interval  # noqa: E402

from clipcap.config import dataset_names, load_config, read_params  # noqa: E402
from clipcap.pipeline.batches import EVENT, dataset_resource  # noqa: E402


FLOWS = Path(__file__).resolve().parent


def deployments(project: Path, datasets: list[str], interval: float | None = None, parts: int = 1,
                dask_address: str | None = None, flow=retrain) -> list:
    """One deployment of ``flow`` (the retraining flow, here or loaded from a source) per dataset, with its
    schedule and its new-data trigger; the trigger passes the event's batch to the run."""
    found = []
    for dataset in datasets:
        cfg = load_config(project / "params.yaml", dataset)
        schedule = Interval(interval) if interval else Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)
        parameters = {"project_dir": str(project), "dataset": dataset, "parts": parts,
                      "dask_address": dask_address}
        found.append(flow.to_deployment(
            name=f"retrain-{dataset}",
            schedule=schedule,
            parameters=parameters,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            triggers=[DeploymentEventTrigger(
                name=f"new data in {dataset}", expect={EVENT}, match={"prefect.resource.id": dataset_resource(dataset)},
                parameters=parameters | {"batch": "{{ event.payload.batch }}"})],
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
    parser.add_argument("--parts", type=int, default=1,
                        help="parts encoding new images, and captioning the test split, at once (flows/parts.py; "
                             "default: 1)")
    parser.add_argument("--dask", default=os.environ.get("CLIPCAP_DASK_ADDRESS"),
                        help="run the parts on the Dask cluster at this scheduler address (default: "
                             "$CLIPCAP_DASK_ADDRESS; none: this machine's processes)")
    parser.add_argument("--work-pool", help="deploy to this Prefect work pool (a process pool, created when "
                                            "missing) and exit, instead of running the flows here")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        parser.error("PREFECT_API_URL is not set: schedules and triggers need a Prefect server "
                     "(prefect server start, or scripts/stack.sh)")
    project = Path(args.project).resolve()
    datasets = args.dataset or dataset_names(read_params(project / "params.yaml"))
    options = (project, datasets, args.interval, args.parts, args.dask)
    if not args.work_pool:
        serve(*deployments(*options))
        return
    ensure_work_pool(args.work_pool)
    from_source = retrain.from_source(source=str(FLOWS), entrypoint="retrain.py:retrain")
    deploy(*deployments(*options, flow=from_source), work_pool_name=args.work_pool, build=False, push=False,
           print_next_steps_message=False, ignore_warnings=True)
    print(f"{len(datasets)} deployments on work pool {args.work_pool}: {', '.join(datasets)}")


def ensure_work_pool(name: str) -> None:
    """Create the ``process`` work pool ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass


if __name__ == "__main__":
    main()

"""Prefect 3 flow: encode one dataset's missing images in N parallel processes, into one store.

    python flows/embed_parts.py [PROJECT_DIR [DATASET [PARTS]]]

Each task runs ``clipcap embed --part I/N`` in-process (the images whose id falls in part I; shards
named after the part, so writers never collide) on Prefect's ``ProcessPoolTaskRunner``; the retraining
flow then runs the DVC embed stage, which finds nothing left to encode and merges the index. For several
machines, swap the task runner for a distributed one (``prefect-dask``'s ``DaskTaskRunner`` with a
cluster address, or ``prefect-ray``): the tasks and the store layout stay the same, the store must be on
a filesystem every machine mounts.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner  # noqa: E402


@task(name="embed-part", task_run_name="embed {dataset} part {number}/{count}")
def embed_part(project_dir: str, dataset: str, number: int, count: int) -> dict:
    """``clipcap embed --part number/count`` for ``dataset``, in this worker process."""
    from clipcap.config import load_config
    from clipcap.pipeline.layout import Layout
    from clipcap.pipeline.stages import embed

    os.chdir(project_dir)  # the manifest's relative paths (user batches) are relative to the project
    stats = embed.run(load_config("params.yaml", dataset), Layout.of(dataset), part=(number - 1, count))
    return asdict(stats) | {"part": f"{number}/{count}", "pid": os.getpid()}


@flow(name="clipcap-embed-parts", flow_run_name="embed-{dataset}-in-{parts}", task_runner=ProcessPoolTaskRunner())
def embed_in_parts(project_dir: str, dataset: str, parts: int = 2) -> list[dict]:
    """Encode ``dataset``'s missing images in ``parts`` tasks at once (one process each, up to the task
    runner's ``max_workers``: the CPU count by default); each part's counts."""
    project = str(Path(project_dir).resolve())
    futures = [embed_part.submit(project, dataset, number, parts) for number in range(1, parts + 1)]
    found = [future.result() for future in futures]
    get_run_logger().info("%s: %s", dataset, "; ".join(f"part {r['part']}: {r['encoded']} encoded (pid {r['pid']})"
                                                      for r in found))
    return found


if __name__ == "__main__":
    arguments = sys.argv[1:4]
    print(json.dumps(embed_in_parts(arguments[0] if arguments else ".", arguments[1] if len(arguments) > 1 else
                                    "tuxpaint", int(arguments[2]) if len(arguments) > 2 else 2), indent=2))

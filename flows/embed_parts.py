"""Prefect 3 flow: encode one dataset's missing images in N parts at once, into one store.

    python flows/embed_parts.py [PROJECT_DIR [DATASET [PARTS [DASK_ADDRESS]]]]

Each task runs ``clipcap embed --part I/N`` (the images whose id falls in part I; shards named after the
part, so writers never collide). The tasks run on Prefect's ``ProcessPoolTaskRunner`` (one machine), or,
given a Dask scheduler's address (``tcp://host:8786``; ``scripts/stack.sh`` starts one and its workers),
on that cluster through ``prefect-dask``'s ``DaskTaskRunner``: each part on whichever worker is free, on
any machine that mounts the project's store. A part whose worker dies is run again on another; it
encodes only the images that have no finished shard yet (shards are written whole or not at all). The
retraining flow then runs the DVC embed stage, which finds nothing left to encode and merges the index.
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
    """Encode ``dataset``'s missing images in ``parts`` tasks at once (on the process pool: one process each,
    up to its ``max_workers``, the CPU count by default; see :func:`on_cluster`); each part's counts."""
    project = str(Path(project_dir).resolve())
    futures = [embed_part.submit(project, dataset, number, parts) for number in range(1, parts + 1)]
    found = [future.result() for future in futures]
    get_run_logger().info("%s: %s", dataset, "; ".join(f"part {r['part']}: {r['encoded']} encoded (pid {r['pid']})"
                                                      for r in found))
    return found


def on_cluster(dask_address: str | None):
    """:func:`embed_in_parts` on this machine's process pool (``dask_address`` None), or with its parts on
    the Dask cluster whose scheduler is at ``dask_address``."""
    if not dask_address:
        return embed_in_parts
    from prefect_dask import DaskTaskRunner

    return embed_in_parts.with_options(task_runner=DaskTaskRunner(address=dask_address))


if __name__ == "__main__":
    arguments = sys.argv[1:5]
    print(json.dumps(on_cluster(arguments[3] if len(arguments) > 3 else None)(
        arguments[0] if arguments else ".", arguments[1] if len(arguments) > 1 else "tuxpaint",
        int(arguments[2]) if len(arguments) > 2 else 2), indent=2))

"""Prefect 3 flow: one stage's per-image work for a dataset in N parts at once: encoding the missing
images (``embed``) or captioning the test split (``evaluate``).

    python flows/parts.py [PROJECT_DIR [DATASET [PARTS [DASK_ADDRESS [STAGE]]]]]     # STAGE: embed (default), evaluate

Each task runs ``clipcap <stage> --part I/N`` (the images whose id falls in part I; what a part writes is
named after it, so writers never collide). The tasks run on Prefect's ``ProcessPoolTaskRunner`` (one
machine), or, given a Dask scheduler's address (``tcp://host:8786``; ``scripts/stack.sh`` starts one and its
workers), on that cluster through ``prefect-dask``'s ``DaskTaskRunner``: each part on whichever worker is
free, on any machine that mounts the project. A part whose worker dies is run again on another; it redoes
only what has no finished file yet (shards and caption files are written whole or not at all). The
retraining flow then runs the DVC stage, which finds the parts' work done: embed merges the index,
evaluate captions nothing and scores.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner  # noqa: E402

STAGES_IN_PARTS = ("embed", "evaluate")


@task(name="stage-part", task_run_name="{stage} {dataset} part {number}/{count}")
def stage_part(project_dir: str, dataset: str, stage: str, number: int, count: int) -> dict:
    """``clipcap <stage> --part number/count`` for ``dataset``, in this worker process."""
    import importlib

    from clipcap.config import load_config
    from clipcap.pipeline.layout import Layout

    os.chdir(project_dir)  # the manifest's relative paths (user batches) are relative to the project
    module = importlib.import_module(f"clipcap.pipeline.stages.{stage}")
    done = module.run(load_config("params.yaml", dataset), Layout.of(dataset), part=(number - 1, count))
    return (asdict(done) if is_dataclass(done) else done) | {"part": f"{number}/{count}", "pid": os.getpid()}


@flow(name="clipcap-parts", flow_run_name="{stage}-{dataset}-in-{parts}", task_runner=ProcessPoolTaskRunner())
def run_in_parts(project_dir: str, dataset: str, parts: int = 2, stage: str = "embed") -> list[dict]:
    """``stage``'s work for ``dataset`` in ``parts`` tasks at once (on the process pool: one process each, up
    to its ``max_workers``, the CPU count by default; see :func:`on_cluster`); each part's counts."""
    if stage not in STAGES_IN_PARTS:
        raise ValueError(f"stage {stage!r}: only {', '.join(STAGES_IN_PARTS)} run in parts")
    project = str(Path(project_dir).resolve())
    futures = [stage_part.submit(project, dataset, stage, number, parts) for number in range(1, parts + 1)]
    found = [future.result() for future in futures]
    get_run_logger().info("%s %s: %s", stage, dataset, "; ".join(
        f"part {r['part']}: {r.get('encoded', r.get('captioned'))} done (pid {r['pid']})" for r in found))
    return found


def on_cluster(dask_address: str | None):
    """:func:`run_in_parts` on this machine's process pool (``dask_address`` None), or with its parts on
    the Dask cluster whose scheduler is at ``dask_address``."""
    if not dask_address:
        return run_in_parts
    from prefect_dask import DaskTaskRunner

    return run_in_parts.with_options(task_runner=DaskTaskRunner(address=dask_address))


if __name__ == "__main__":
    arguments = sys.argv[1:6]
    print(json.dumps(on_cluster(arguments[3] if len(arguments) > 3 and arguments[3] != "-" else None)(
        arguments[0] if arguments else ".", arguments[1] if len(arguments) > 1 else "tuxpaint",
        int(arguments[2]) if len(arguments) > 2 else 2, arguments[4] if len(arguments) > 4 else "embed"), indent=2))

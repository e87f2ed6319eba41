"""Prefect 3 flow: run one dataset's DVC pipeline stage by stage and return the registered model version.

    python flows/retrain.py [PROJECT_DIR [DATASET]]

Works with no Prefect server configured (an ephemeral one is started). The flow never
re-implements a stage: each task is ``dvc repro --single-item <stage>``, so DVC decides what
is up to date and a run with nothing new trains nothing. DATASET is one of params.yaml's ``datasets``
(default: the first); its stages are ``<stage>@<dataset>`` and its artifacts ``artifacts/<dataset>/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))

from prefect import flow, get_run_logger, task  # noqa: E402  (after the offline settings)

from clipcap.config import dataset_names, read_params  # noqa: E402
from clipcap.pipeline import STAGES  # noqa: E402
from clipcap.pipeline.layout import Layout  # noqa: E402


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project_dir: str) -> None:
    """``dvc repro --single-item <stage>`` in ``project_dir``, streaming its output to the flow log."""
    logger = get_run_logger()
    process = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=project_dir, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line and "\r" not in line:
            logger.info("%s | %s", stage, line)
        tail = (tail + [line])[-40:]
    if process.wait() != 0:
        raise RuntimeError(f"stage {stage!r} failed (exit {process.returncode}):\n" + "\n".join(tail))


@task(name="dvc-status", task_run_name="what is stale for {dataset}")
def stale_stages(dataset: str, project_dir: str) -> list[str]:
    """The stages up to ``register@<dataset>`` that ``dvc status`` finds out of date (fetch's
    'always changed' left out: it has just run)."""
    done = subprocess.run(["dvc", "status", "--json", "--with-deps", f"register@{dataset}"], cwd=project_dir,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc status failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return sorted(stage for stage, why in json.loads(done.stdout or "{}").items() if why != ["always changed"])


@flow(name="clipcap-retrain")
def retrain(project_dir: str = ".", dataset: str | None = None) -> dict:
    """Run fetch, and when it found something new validate -> embed -> train -> evaluate -> register for
    ``dataset``; return the registration, or ``{"skipped": True, ...}`` when nothing was new."""
    project = Path(project_dir).resolve()
    dataset = dataset or dataset_names(read_params(project / "params.yaml"))[0]
    (project / "data" / dataset).mkdir(parents=True, exist_ok=True)  # its batches (data.dvc tracks data/)
    run_stage(f"{STAGES[0]}@{dataset}", str(project))  # looks for new data, hashing only new files
    stale = stale_stages(dataset, str(project))
    if not stale:
        get_run_logger().info("%s: nothing new since the last run; skipped (trained nothing)", dataset)
        return {"dataset": dataset, "skipped": True, "reason": "nothing new since the last run"}
    get_run_logger().info("%s: out of date: %s", dataset, ", ".join(stale))
    for stage in STAGES[1:]:
        run_stage(f"{stage}@{dataset}", str(project))
    registered = json.loads((project / Layout.of(dataset).registered).read_text()) | {"skipped": False}
    get_run_logger().info("registered %s version %s (champion: %s)", registered["name"], registered["version"],
                          registered["promoted_to_champion"])
    return registered


if __name__ == "__main__":
    print(json.dumps(retrain(*sys.argv[1:3]), indent=2))

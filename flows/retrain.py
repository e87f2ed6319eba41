"""Prefect 3 flow: run the DVC pipeline stage by stage and return the registered model version.

    python flows/retrain.py [PROJECT_DIR]

Works with no Prefect server configured (an ephemeral one is started). The flow never
re-implements a stage: each task is ``dvc repro --single-item <stage>``, so DVC decides what
is up to date and a run with nothing new trains nothing.
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

from clipcap.pipeline import STAGES  # noqa: E402


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


@flow(name="clipcap-retrain")
def retrain(project_dir: str = ".") -> dict:
    """Run fetch -> validate -> embed -> train -> evaluate -> register; return the registration."""
    project = Path(project_dir).resolve()
    (project / "data").mkdir(exist_ok=True)  # data.dvc tracks it; a fresh clone may not have it yet
    for stage in STAGES:
        run_stage(stage, str(project))
    registered = json.loads((project / "artifacts" / "registered.json").read_text())
    get_run_logger().info("registered %s version %s (champion: %s)", registered["name"], registered["version"],
                          registered["promoted_to_champion"])
    return registered


if __name__ == "__main__":
    print(json.dumps(retrain(sys.argv[1] if len(sys.argv) > 1 else "."), indent=2))

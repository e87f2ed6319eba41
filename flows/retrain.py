"""Prefect 3 flow: keep one dataset's captioner fresh, and what each run did as a Prefect artifact.

    python flows/retrain.py [PROJECT_DIR [DATASET]]     # one run now (an ephemeral Prefect server is started)
    python flows/serve.py                                # a deployment per dataset: schedules and new-data events

The flow never re-implements a stage: each task reproduces ``<stage>@<dataset>`` as ``dvc repro
--single-item`` would, so DVC decides what is up to date and records what a stage wrote. Fetch runs first
(it looks for new images, hashing only new files); when ``dvc status`` then finds nothing stale, the run
trains nothing and says it skipped. After a registration the dataset's artifacts are pushed to the
project's DVC remote (when it has one).

Runs of different datasets overlap; two runs of one dataset never do. A run holds its dataset's lock
from start to end, and each stage's command runs outside DVC's repository lock, only the short ``dvc``
commands around it (what is stale, record the outputs) take the project's lock, one at a time
(``clipcap.pipeline.dvc_project``): so two datasets train at once, and a user adding a batch waits
seconds, never fails with DVC's "busy".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import STAGES_IN_PARTS, on_cluster  # noqa: E402  (flows/parts.py)
from prefect import flow, get_run_logger, task  # noqa: E402  (after the offline settings)
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from clipcap.config import dataset_names, read_params  # noqa: E402
from clipcap.fileio import read_json  # noqa: E402
from clipcap.pipeline import STAGES, dvc_project  # noqa: E402
from clipcap.pipeline.batches import images_of_batch  # noqa: E402
from clipcap.pipeline.layout import Layout  # noqa: E402
from clipcap.pipeline.reports import gallery_link, retrain_report  # noqa: E402


def _artifact_key(dataset: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes."""
    return "retrain-" + "".join(c if c.isalnum() else "-" for c in dataset.lower())


def _reproduce(stage: str, project_dir: str) -> bool:
    logger = get_run_logger()
    return dvc_project.reproduce(Path(project_dir), stage, echo=lambda line: logger.info("%s", line))


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project_dir: str) -> bool:
    """Reproduce ``stage`` in ``project_dir`` (its command's output in the flow log); False when up to date."""
    return _reproduce(stage, project_dir)


@task(name="look-for-new-data", task_run_name="fetch@{dataset}", retries=2, retry_delay_seconds=30)
def fetch(dataset: str, project_dir: str) -> None:
    """The fetch stage; retried, since it may download (a source URL, an annotations file)."""
    _reproduce(f"{STAGES[0]}@{dataset}", project_dir)


@task(name="dvc-status", task_run_name="what is stale for {dataset}")
def stale_stages(dataset: str, project_dir: str) -> list[str]:
    """The stages up to ``register@<dataset>`` that ``dvc status`` finds out of date (fetch's
    'always changed' left out: it has just run)."""
    found = dvc_project.stale(Path(project_dir), f"register@{dataset}")
    return sorted(stage for stage, why in found.items() if why != ["always changed"])


@task(name="dvc-push", task_run_name="push {dataset}", retries=2, retry_delay_seconds=30)
def push(dataset: str, project_dir: str) -> str | None:
    """Push the dataset's artifacts (and its data) to the DVC remote: what ``clipcap models restore`` pulls."""
    logger = get_run_logger()
    return dvc_project.push(Path(project_dir), dataset, STAGES[:-1], echo=lambda line: logger.info("%s", line))


@flow(name="clipcap-retrain", flow_run_name="retrain-{dataset}")
def retrain(project_dir: str = ".", dataset: str | None = None, parts: int = 1,
            dask_address: str | None = None, batch: str | None = None) -> dict:
    """Run fetch, and when it found something new validate -> embed -> train -> evaluate -> register for
    ``dataset``; return the registration, or ``{"skipped": True, ...}`` when nothing was new. With ``parts``
    > 1 the new images are encoded, and the test images captioned, in that many parts at once (flows/parts.py:
    this machine's processes, or the workers of the Dask cluster at ``dask_address``) before the embed and
    evaluate stages take the parts' work in. ``batch``: the batch whose arrival started the run (its event's
    payload); the result and the report say how many of its images are in the data the model now comes from."""
    project = Path(project_dir).resolve()
    dataset = dataset or dataset_names(read_params(project / "params.yaml"))[0]
    layout = Layout(project / Layout.of(dataset).root)
    with dvc_project.dataset_lock(project, dataset):
        result = _retrain(project, dataset, layout, parts, dask_address)
        if batch:
            result["batch"] = {"name": batch, "images_in_data": images_of_batch(layout.manifest, batch)}
        create_markdown_artifact(key=_artifact_key(dataset), description=result.pop("summary"),
                                 markdown=result.pop("report") + _batch_line(result.get("batch")))
    return result


def _batch_line(batch: dict | None) -> str:
    if not batch:
        return ""
    return (f"\nStarted by batch {batch['name']}: {batch['images_in_data']} of its images in the data "
            "(the manifest this model was trained and tested on).\n")


def _retrain(project: Path, dataset: str, layout: Layout, parts: int, dask_address: str | None) -> dict:
    """The run, under the dataset's lock; its result with the report's ``summary`` and ``report`` text."""
    logger = get_run_logger()
    dvc_project.keep_batches_folders(project, [dataset])  # its batches folder, kept in data.dvc (a stage dep)
    fetch(dataset, str(project))
    stale = stale_stages(dataset, str(project))
    if not stale:
        reason = "nothing new since the last run"
        logger.info("%s: %s; skipped (trained nothing)", dataset, reason)
        return {"dataset": dataset, "skipped": True, "reason": reason, "summary": f"{dataset}: skipped",
                "report": f"# {dataset}: skipped\n\n{reason.capitalize()}: no stage was out of date, "
                          "nothing was trained.\n"}
    logger.info("%s: out of date: %s", dataset, ", ".join(stale))
    for stage in STAGES[1:]:
        if stage in STAGES_IN_PARTS and parts > 1:
            on_cluster(dask_address)(str(project), dataset, parts, stage)
        run_stage(f"{stage}@{dataset}", str(project))
    registered = read_json(layout.registered) | {"dataset": dataset, "skipped": False}
    registered["dvc_remote"] = push(dataset, str(project))
    logger.info("registered %s version %s (champion: %s): %s", registered["name"], registered["version"],
                registered["promoted_to_champion"], registered["gate"])
    return registered | {
        "summary": f"{registered['name']} version {registered['version']}: "
                   + ("promoted" if registered["promoted_to_champion"] else "not promoted"),
        "report": retrain_report(registered, read_json(layout.metrics), gallery_link(registered, layout.gallery))}


if __name__ == "__main__":
    print(json.dumps(retrain(*sys.argv[1:3]), indent=2))

"""The retraining loop under load on the team stack: several datasets, several new batches each, announced
at once; PostgreSQL stores beside the single-user SQLite ones.

    python benchmarks/loop_load.py [--datasets 4] [--batches 3] [--workers 2] [--stores postgres sqlite]

For each store a fresh project (this clone's pipeline, tiny params: tests/projects.py) holds ``--datasets``
folder datasets of Tux Paint stamps, one category each, never trained. ``scripts/stack.sh start --db STORE``
brings up the stack with ``--workers`` Prefect workers; then every ``clipcap add-batch`` (``--datasets`` x
``--batches`` of them, 3 stamps each) is fired at the same moment, each sending its ``clipcap.batch.added``
event, and the benchmark waits until every event's run has ended. Per store:

- ``events``: batches added and announced; ``runs``: flow runs the events started (each run carries its
  event's batch; a dataset's runs never overlap, so a run queued behind another often finds its batch already
  trained on and skips);
- ``runs_that_saw_their_batch``: completed runs whose report says every image of their batch is in the data
  the dataset's model came from; ``failed``: runs failed or crashed;
- ``registry_versions`` / ``runs_that_registered``: no registry write lost when they are equal; ``latest``:
  each dataset's last version holds all its batches;
- ``retried_requests``: requests a client had to retry: Prefect API answers 503 (logged by the server) and
  MLflow answers 5xx (its access log);
- ``p95_api_ms``: the 95th percentile of this benchmark's Prefect API requests (a poll each second) while the
  load runs; ``wall_s``: from the first batch added to the last run ended; ``overlap_s``: seconds two or more
  runs were running at once.

Writes benchmarks/results/loop-load-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from model_speed import cpu_model, save_report  # noqa: E402  (benchmarks/model_speed.py)
from projects import ROOT, STAMPS, captioned_folder, new_project  # noqa: E402  (tests/projects.py)
from stacks import TERMINAL, Stack, parse_time  # noqa: E402  (tests/stacks.py)

from clipcap.fileio import read_json  # noqa: E402
from clipcap.pipeline.batches import images_of_batch  # noqa: E402

CATEGORIES = ("animals", "food", "town", "plants", "vehicles", "household")
BASE_IMAGES, BATCH_IMAGES = 12, 3
SAW = re.compile(r"Started by batch (\S+): (\d+) of its images in the data")


def stamps_of(category: str, count: int) -> list[str]:
    """The first ``count`` described stamps of ``category`` (paths under the stamps folder), sorted."""
    found = sorted(p for p in (STAMPS / category).rglob("*.png") if p.with_suffix(".txt").exists())
    if len(found) < count:
        raise SystemExit(f"{category}: {len(found)} described stamps, {count} needed")
    return [str(p.relative_to(STAMPS)) for p in found[:count]]


def build(root: Path, datasets: list[str], batches: int) -> tuple[Path, dict[str, list[Path]]]:
    """The project (one folder dataset per category) and each dataset's batch folders, not yet added."""
    project = root / "project"
    folders: dict[str, list[Path]] = {}
    overrides = {}
    for dataset in datasets:
        stamps = stamps_of(dataset, BASE_IMAGES + batches * BATCH_IMAGES)
        captioned_folder(project / "photos" / dataset, stamps[:BASE_IMAGES])
        overrides[dataset] = {"dataset": {"source": "folder", "root": f"photos/{dataset}", "limit": None}}
        folders[dataset] = [captioned_folder(root / "batches" / dataset / f"{dataset}-{n}",
                                             stamps[BASE_IMAGES + n * BATCH_IMAGES:BASE_IMAGES + (n + 1) * BATCH_IMAGES])
                            for n in range(batches)]
    new_project(project, overrides)
    shutil.copytree(ROOT / "flows", project / "flows")   # the project's own flows: what the stack deploys and runs
    return project, folders


def overlap_seconds(runs: list[dict]) -> float:
    """Seconds during which at least two of ``runs`` were running."""
    edges = sorted([(parse_time(r["start_time"]).timestamp(), 1) for r in runs if r["start_time"] and r["end_time"]]
                   + [(parse_time(r["end_time"]).timestamp(), -1) for r in runs if r["start_time"] and r["end_time"]])
    total, running, since = 0.0, 0, None
    for moment, step in edges:
        if running >= 2 and since is not None:
            total += moment - since
        running += step
        since = moment
    return round(total, 1)


def load(store: str, root: Path, datasets: list[str], batches: int, workers: int, timeout: float) -> dict:
    project, folders = build(root, datasets, batches)
    stack = Stack(project, root / "stack", CLIPCAP_PREFECT_WORKERS=str(workers))
    print(f"[{store}] starting the stack ({workers} Prefect workers)...", flush=True)
    stack.stack("start", "--db", store)
    try:
        deployments = {stack.deployment(dataset)["id"]: dataset for dataset in datasets}
        events = [(dataset, folder) for dataset in datasets for folder in folders[dataset]]
        print(f"[{store}] adding {len(events)} batches at once...", flush=True)
        started = time.time()
        with ThreadPoolExecutor(len(events)) as pool:
            added = list(pool.map(lambda event: stack.clipcap("add-batch", event[0], str(event[1])), events))
        announced = sum("clipcap.batch.added sent" in out for out in added)
        stack.latencies_ms.clear()   # from here on: the API under the load of the runs
        body = {"deployments": {"id": {"any_": list(deployments)}}, "sort": "START_TIME_ASC"}
        deadline = time.monotonic() + timeout
        while True:
            runs = [r for r in stack.call("POST", "/flow_runs/filter", json=body).json()
                    if r["parameters"].get("batch")]   # the events' runs, not the schedules' (params.yaml's cron)
            ended = [r for r in runs if r["state_type"] in TERMINAL]
            if len(ended) >= len(events) and len(ended) == len(runs):
                break
            if time.monotonic() > deadline:
                print(f"[{store}] timed out: {len(ended)} of {len(runs)} runs ended", flush=True)
                break
            time.sleep(1)
        wall = max((parse_time(r["end_time"]).timestamp() for r in ended), default=time.time()) - started
        return summarise(stack, runs, folders, announced, wall)
    finally:
        print(f"[{store}] {stack.stack('destroy').strip().splitlines()[-1]}", flush=True)


def summarise(stack: Stack, runs: list[dict], folders: dict[str, list[Path]], announced: int, wall: float) -> dict:
    """The figures of one store's load run (the module's docstring says what each means)."""
    saw, per_batch, registered = 0, {}, 0
    for flow_run in runs:
        batch = flow_run["parameters"].get("batch")
        per_batch[batch] = per_batch.get(batch, 0) + 1
        report = stack.report(flow_run) if flow_run["state_type"] == "COMPLETED" else None
        found = SAW.search(report["data"]) if report else None
        if found and found.group(1) == batch and int(found.group(2)) == BATCH_IMAGES:
            saw += 1
        if report and not report["description"].endswith(": skipped"):
            registered += 1
    versions = {dataset: stack.versions(dataset) for dataset in folders}
    latest_has_every_batch = {}   # the last version registered is the newest in the registry, from every batch
    for dataset, numbers in versions.items():
        artifacts = stack.project / "artifacts" / dataset
        last = read_json(artifacts / "registered.json")["version"] if (artifacts / "registered.json").exists() else None
        latest_has_every_batch[dataset] = bool(numbers) and str(last) == str(numbers[-1]) and all(
            images_of_batch(artifacts / "manifest.parquet", folder.name) == BATCH_IMAGES for folder in folders[dataset])
    logs = {name: (stack.state / f"{name}.log").read_text(errors="replace")
            for name in ("prefect-server", "mlflow-server")}
    retried = {"prefect_503": logs["prefect-server"].count("Encountered retryable exception in request"),
               "mlflow_5xx": len(re.findall(r'HTTP/1\.\d" 5\d\d', logs["mlflow-server"]))}
    latencies = np.array(stack.latencies_ms or [0.0])
    result = {
        "events": announced,
        "runs": len(runs),
        "runs_per_batch": sorted(per_batch.values()),
        "runs_that_saw_their_batch": saw,
        "runs_skipped": sum(1 for r in runs if r["state_type"] == "COMPLETED") - registered,
        "runs_that_registered": registered,
        "failed": sum(1 for r in runs if r["state_type"] in ("FAILED", "CRASHED")),
        "registry_versions": sum(len(v) for v in versions.values()),
        "latest_version_has_every_batch": all(latest_has_every_batch.values()),
        "retried_requests": sum(retried.values()),
        "retried_by_server": retried,
        "wall_s": round(wall, 1),
        "overlap_s": overlap_seconds(runs),
        "p95_api_ms": round(float(np.percentile(latencies, 95)), 1),
        "api_requests": len(stack.latencies_ms),
    }
    print(json.dumps(result), flush=True)
    return result


def render(report: dict) -> str:
    keys = ["events", "runs", "runs_that_saw_their_batch", "failed", "runs_that_registered", "registry_versions",
            "latest_version_has_every_batch", "runs_skipped", "retried_requests", "wall_s", "overlap_s", "p95_api_ms"]
    stores = [s for s in ("postgres", "sqlite") if s in report]
    lines = [f"# Retraining loop under load ({report['machine']['cpu']}, {report['machine']['cores']} cores)", "",
             f"{report['datasets']} datasets x {report['batches']} batches ({BATCH_IMAGES} images each) added at once, "
             f"{report['workers']} Prefect workers; `python benchmarks/loop_load.py` at {report['commit']}, "
             f"{report['date']}.", "",
             "| | " + " | ".join(stores) + " |", "|---|" + "---|" * len(stores)]
    lines += [f"| {key} | " + " | ".join(str(report[s][key]) for s in stores) + " |" for key in keys]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stores", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the runs, per store")
    args = parser.parse_args()
    datasets = list(CATEGORIES[:args.datasets])
    report = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))},
              "commit": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "datasets": len(datasets), "batches": args.batches,
              "workers": args.workers}
    for store in args.stores:
        with tempfile.TemporaryDirectory(prefix=f"clipcap-load-{store}-") as root:
            report[store] = load(store, Path(root), datasets, args.batches, args.workers, args.timeout)
    print(f"wrote {save_report('loop-load', report, render(report))}.json and .md")


if __name__ == "__main__":
    main()

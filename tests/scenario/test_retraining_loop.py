"""The retraining loop running by itself on the team stack (scripts/stack.sh: a PostgreSQL server under a
real Prefect server and a real MLflow tracking server, the deployments on a work pool whose two Prefect
workers run them), checked from the Prefect API and the MLflow registry.

Two datasets: Tux Paint with the sports stamps held back, and a user's folder dataset. Both deployments
run on a short interval: each first run trains and promotes (the two at the same time, on the two
workers), the next finds nothing new and skips.
Then `clipcap add-batch` adds the sports stamps to tuxpaint: the event-triggered run embeds only them (in
parts, on the stack's Dask workers), warm-starts from the champion, re-scores the champion on the grown
test split and gates; the folder dataset's captioner is untouched. A registered version is restored from the DVC remote in a fresh
copy of the project with the same test metrics; `clipcap models rollback` moves the champion back.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime

import pandas as pd
import pytest

from clipcap.modeling.encoders import encoder_key
from clipcap.pipeline.embedding_store import EmbeddingStore, read_shard
from projects import MINE, MINE_OVERRIDES, ROOT, captioned_folder, new_project, run
from stacks import Stack, parse_time

pytestmark = pytest.mark.pipeline

HELD_BACK = [f"sports/{name}.png" for name in ("australian_rules_football", "basketball", "cricketball", "football",
                                                "rugby_goal_posts", "soccer", "tennis_ball", "tennis_racket",
                                                "trophy_cup")]  # the first lands in the test split
INTERVAL_S = 60
TRAINING_RUN_S = 900    # a first run on 2 busy cores, both datasets at once


def _skipped(report: dict) -> bool:
    return report["description"].endswith(": skipped")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The project (tuxpaint: 40 stamps, no sports; mine: 12 stamps in a folder), a DVC remote, the stack."""
    root = tmp_path_factory.mktemp("scenario")
    project = root / "project"
    captioned_folder(project / "photos", MINE)
    new_project(project, {"tuxpaint": {}, "mine": MINE_OVERRIDES})
    run(["dvc", "remote", "add", "-q", "-d", "store", str(root / "dvc-remote")], project)
    shutil.copytree(ROOT / "flows", project / "flows")
    running = Stack(project, root / "stack")
    running.stack("start", "--interval", str(INTERVAL_S))
    try:
        yield running
    finally:
        stopped = running.stack("destroy")   # stops everything, then deletes the stack's databases
        assert "prefect-worker-1: stopped" in stopped and "prefect-server: stopped" in stopped, stopped
        assert "postgres: stopped" in stopped, stopped


@pytest.fixture(scope="module")
def first_runs(stack) -> dict[str, tuple[dict, dict]]:
    return {dataset: stack.wait_for_run(dataset, lambda r: not _skipped(r), TRAINING_RUN_S)
            for dataset in ("tuxpaint", "mine")}


def test_each_scheduled_first_run_trains_and_promotes(stack, first_runs):
    for dataset, (flow_run, report) in first_runs.items():
        assert flow_run["auto_scheduled"] is True  # the schedule started it, nobody by hand
        assert report["description"] == f"clipcap-{dataset} version 1: promoted"
        assert "**Gate: promoted to champion.** no champion yet" in report["data"]
        assert "| retrieval baseline |" in report["data"] and "gallery.html" in report["data"]
        assert stack.champion(dataset) == 1
        run_ = stack.mlflow.get_run(stack.mlflow.get_model_version(f"clipcap-{dataset}", "1").run_id)
        assert run_.data.tags["clipcap.dvc.train"] and run_.data.tags["clipcap.data"]
    assert any((stack.project.parent / "dvc-remote").rglob("*")), "nothing was pushed to the DVC remote"


def test_the_two_datasets_first_runs_overlap_inparse_time(first_runs):
    """Different datasets retrain at once (each run holds only its dataset's lock; Prefect API timestamps)."""
    starts = [parse_time(flow_run["start_time"]) for flow_run, _ in first_runs.values()]
    ends = [parse_time(flow_run["end_time"]) for flow_run, _ in first_runs.values()]
    assert max(starts) < min(ends), f"started {starts}, ended {ends}"


def test_a_run_with_nothing_new_skips_in_under_a_minute(stack, first_runs):
    both_done = max(parse_time(trained["end_time"]) for trained, _ in first_runs.values())
    for dataset in first_runs:
        flow_run, report = stack.wait_for_run(dataset, _skipped, 4 * INTERVAL_S + 300, after=both_done)
        took = (parse_time(flow_run["end_time"]) - parse_time(flow_run["start_time"])).total_seconds()
        assert took < 60, f"{flow_run['name']} took {took:.0f} s"
        assert "nothing was trained" in report["data"]
    assert stack.versions("tuxpaint") == [1] and stack.versions("mine") == [1]


def test_a_version_restores_from_the_dvc_remote_with_its_metrics(stack, first_runs, tmp_path):
    """A fresh copy of the project (no artifacts, no dvc.lock) pulls version 1's artifacts and re-evaluates
    them to the metrics MLflow holds for it."""
    fresh = tmp_path / "fresh"
    captioned_folder(fresh / "photos", MINE)
    new_project(fresh, {"tuxpaint": {}, "mine": MINE_OVERRIDES})
    run(["dvc", "remote", "add", "-q", "-d", "store", str(stack.project.parent / "dvc-remote")], fresh)
    env = stack.env
    out = run([str(fresh / "scripts" / "bin" / "clipcap"), "models", "restore", "tuxpaint", "1"], fresh, env)
    assert "restored artifacts/tuxpaint/ of clipcap-tuxpaint version 1" in out, out
    assert (fresh / "artifacts" / "tuxpaint" / "model").is_dir()
    run([str(fresh / "scripts" / "bin" / "clipcap"), "--dataset", "tuxpaint", "evaluate"], fresh, env)
    again = json.loads((fresh / "artifacts" / "tuxpaint" / "metrics.json").read_text())["model"]
    logged = stack.mlflow.get_run(stack.mlflow.get_model_version("clipcap-tuxpaint", "1").run_id).data.metrics
    for name in ("BLEU-4", "METEOR", "CIDEr"):
        assert again[name] == pytest.approx(logged[f"model_{name}"], abs=1e-6), name


def test_a_new_batch_triggers_a_warm_started_gated_retrain_of_its_dataset_only(stack, first_runs, tmp_path):
    deployment = stack.deployment("tuxpaint")
    for schedule in deployment["schedules"]:  # from here on only the event starts tuxpaint's runs
        stack.call("PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}", json={"active": False})
    time.sleep(2 * INTERVAL_S)  # a scheduled run already under way ends first
    test_before = json.loads((stack.project / "artifacts" / "tuxpaint" / "metrics.json").read_text())["test_images"]
    added_at = datetime.now().astimezone()
    out = stack.clipcap("add-batch", "tuxpaint", str(captioned_folder(tmp_path / "sports", HELD_BACK)))
    assert "batch sports added" in out and "recorded in data.dvc" in out and "clipcap.batch.added sent" in out, out
    flow_run, report = stack.wait_for_run("tuxpaint", lambda r: not _skipped(r), TRAINING_RUN_S, after=added_at)
    assert flow_run["auto_scheduled"] is False  # the event's trigger started it
    assert report["description"].startswith("clipcap-tuxpaint version 2")
    assert f"Started by batch sports: {len(HELD_BACK)} of its images in the data" in report["data"], report["data"]
    artifacts = stack.project / "artifacts" / "tuxpaint"
    embedded = json.loads((artifacts / "embed.json").read_text())   # the stage found every image encoded:
    assert embedded["encoded"] == 0 and embedded["reused"] == embedded["total"]   # the parts on Dask did it
    store = EmbeddingStore(artifacts / "embeddings", encoder_key("efficientnet-lite0"))
    new_shards = [path for path in store.shards() if path.stat().st_mtime > added_at.timestamp()]
    assert new_shards and all("part" in path.name for path in new_shards), new_shards
    assert sum(len(read_shard(path)[0]) for path in new_shards) == len(HELD_BACK)   # only the new images
    summary = json.loads((artifacts / "training" / "summary.json").read_text())
    assert summary["warm_start"]["from"] == "models:/clipcap-tuxpaint/1", summary["warm_start"]
    trained, manifest = summary["warm_start"]["images"], pd.read_parquet(artifacts / "manifest.parquet")
    new_in_train = manifest[(manifest["split"] == "train") & manifest["path"].str.contains("/sports/")]
    assert trained["new"] == len(new_in_train) >= 1, trained   # every new training image, and a replayed sample of
    assert trained["old"] == min(3 * trained["new"], (manifest["split"] == "train").sum() - trained["new"])  # the old
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["test_images"] > test_before  # some sports stamps fall in the test split
    registered = json.loads((artifacts / "registered.json").read_text())
    assert "re-scored on this test set" in registered["gate"], registered["gate"]
    assert stack.champion("tuxpaint") == (2 if registered["promoted_to_champion"] else 1)
    assert stack.versions("mine") == [1] and stack.champion("mine") == 1  # the other captioner is untouched


def test_rollback_returns_the_champion(stack, first_runs):
    if stack.champion("tuxpaint") == 1:  # the gate kept version 1: serve 2 by hand first, then roll it back
        stack.clipcap("models", "promote", "tuxpaint", "2", "--reason", "scenario")
    out = stack.clipcap("models", "rollback", "tuxpaint", "--reason", "scenario")
    assert "clipcap-tuxpaint version 1 is the champion" in out, out
    assert stack.champion("tuxpaint") == 1
    version = stack.mlflow.get_model_version("clipcap-tuxpaint", "1")
    assert version.tags["clipcap.promoted_why"].startswith("rolled back from version 2")

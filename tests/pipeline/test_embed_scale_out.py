"""Work scaled out over two worker processes (flows/parts.py on Prefect's ProcessPoolTaskRunner): embedding
fills one store with shards of their own, the embed stage merges the index, and every image's embedding
equals a single-process run's (to floating-point rounding); the test split captioned in two parts gives the
evaluate stage the captions one process makes."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pandas as pd
import pytest
import torch

from clipcap.modeling.encoders import encoder_key
from clipcap.pipeline.embedding_store import EmbeddingStore
from projects import ROOT, new_project, run

pytestmark = pytest.mark.pipeline


def _flow_module():
    spec = importlib.util.spec_from_file_location("clipcap_parts", ROOT / "flows" / "parts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_worker_processes_give_the_single_process_store(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    parallel = new_project(tmp_path / "parallel", {"tuxpaint": {}})
    run(["dvc", "repro", "validate@tuxpaint"], parallel)
    single = tmp_path / "single"
    shutil.copytree(parallel, single)

    with prefect_test_harness(server_startup_timeout=120):
        parts = _flow_module().run_in_parts(str(parallel), "tuxpaint", 2)
    assert sorted(p["part"] for p in parts) == ["1/2", "2/2"]
    assert len({p["pid"] for p in parts}) == 2  # two processes
    manifest = pd.read_parquet(parallel / "artifacts" / "tuxpaint" / "manifest.parquet")
    assert sum(p["encoded"] for p in parts) == len(manifest) and all(p["encoded"] > 0 for p in parts)

    out = run(["dvc", "repro", "embed@tuxpaint"], parallel)  # the stage: nothing left to encode, merges the index
    assert f"{len(manifest)} already embedded" in out and "0 to encode" in out, out
    run(["dvc", "repro", "embed@tuxpaint"], single)

    key = encoder_key("efficientnet-lite0")
    stores = [EmbeddingStore(p / "artifacts" / "tuxpaint" / "embeddings", key) for p in (parallel, single)]
    names = sorted(p.name for p in stores[0].shards())
    assert any("part1of2" in n for n in names) and any("part2of2" in n for n in names), names
    ids = manifest["image_id"].tolist()
    # the same images under the same ids, the same values up to floating-point order: on some CPUs (seen on
    # an AMD EPYC, not on an Intel Xeon) a worker process's kernels round the last bits differently
    torch.testing.assert_close(stores[0].get(ids), stores[1].get(ids), rtol=1e-5, atol=1e-6)


def _predictions(project) -> dict[str, str]:
    lines = (project / "artifacts" / "tuxpaint" / "evaluation" / "predictions.jsonl").read_text().splitlines()
    return {row["image_id"]: row["prediction"] for row in map(json.loads, filter(None, lines))}


def test_the_test_split_captioned_in_two_parts_gives_the_captions_of_one_process(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    project = new_project(tmp_path / "parts", {"tuxpaint": {}})
    run(["dvc", "repro", "train@tuxpaint"], project)
    with prefect_test_harness(server_startup_timeout=120):
        parts = _flow_module().run_in_parts(str(project), "tuxpaint", 2, "evaluate")
    manifest = pd.read_parquet(project / "artifacts" / "tuxpaint" / "manifest.parquet")
    test_images = int((manifest["split"] == "test").sum())
    assert sorted(p["part"] for p in parts) == ["1/2", "2/2"] and len({p["pid"] for p in parts}) == 2
    assert sum(p["captioned"] for p in parts) == test_images and all(p["captioned"] > 0 for p in parts), parts

    out = run(["dvc", "repro", "evaluate@tuxpaint"], project)   # the stage: every caption made, it scores
    assert f"{test_images} test captions made by parts, 0 to make here" in out, out
    by_parts = _predictions(project)
    assert not (project / "artifacts" / "tuxpaint" / "caption-parts").exists()   # consumed
    run([str(project / "scripts" / "bin" / "clipcap"), "--dataset", "tuxpaint", "evaluate"], project)  # one process
    assert _predictions(project) == by_parts and len(by_parts) == test_images

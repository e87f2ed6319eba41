"""All six stages on a small real subset, through real DVC, MLflow and a Prefect flow."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from clipcap.errors import ClipcapError
from projects import MINE, MINE_OVERRIDES, ROOT, TINY_PARAMS, captioned_folder, new_project, run

pytestmark = pytest.mark.pipeline

TUXPAINT = Path("artifacts") / "tuxpaint"  # the tuxpaint dataset's artifacts
BATCH = ["vehicles/flight/planes/747.png", "food/pizza.png", "sports/soccer.png", "clothes/t_baseballcap.png",
         "people/cartoon/mermaid.png", "animals/mammals/cats/tiger_sumatran.png"]
_run = run


def _load_flow_module():
    spec = importlib.util.spec_from_file_location("clipcap_retrain_flow", ROOT / "flows" / "retrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh project: this repo's pipeline and code, tiny params, a user batch under data/."""
    project = tmp_path_factory.mktemp("project")
    captioned_folder(project / "data" / "tuxpaint" / "batch-001", BATCH)
    return new_project(project, {"tuxpaint": {}})  # a second dataset joins in a later test


@pytest.fixture(scope="module")
def registered(project) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        return _load_flow_module().retrain(str(project))


@pytest.fixture
def photos(tmp_path) -> list[str]:
    """Two photos the model never saw."""
    from skimage import data

    paths = []
    for name in ("astronaut", "coffee"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(str(path))
    return paths


def test_flow_registers_a_champion(project, registered):
    assert registered["name"] == "clipcap-tuxpaint" and registered["version"] == 1
    assert registered["promoted_to_champion"] is True
    manifest = pd.read_parquet(project / TUXPAINT / "manifest.parquet")
    assert len(manifest) == 40 + len(BATCH)
    assert (manifest["source"] == "batch:batch-001").sum() == len(BATCH)


def test_metrics_hold_model_and_both_baselines(project, registered):
    from clipcap.pipeline.baselines import most_frequent_caption
    from clipcap.pipeline.metrics import cider

    metrics = json.loads((project / TUXPAINT / "metrics.json").read_text())
    for system in ("model", "baseline_most_frequent", "baseline_retrieval"):
        assert "SPICE" in metrics[system]
        for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
            assert isinstance(metrics[system][name], float), (system, name)
    # each system's CIDEr is its captions' CIDEr against the manifest's test references, recomputed here
    manifest = pd.read_parquet(project / TUXPAINT / "manifest.parquet")
    references = {i: list(c) for i, c in zip(manifest["image_id"], manifest["captions"])}
    test_ids = manifest.loc[manifest["split"] == "test", "image_id"].tolist()
    records = [json.loads(line) for line in
               (project / TUXPAINT / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in records] == test_ids and metrics["test_images"] == len(test_ids) >= 5
    test_refs = {i: references[i] for i in test_ids}
    frequent = most_frequent_caption([references[i] for i in manifest.loc[manifest["split"] == "train", "image_id"]])
    from clipcap.naming import names_object_rate
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    labelled = {r["image_id"]: r["label"] for r in records}  # the encoder has an ImageNet head: the label baseline
    assert all(c.removeprefix("An ").removeprefix("A ").removesuffix(".") in _IMAGENET_CATEGORIES
               for c in labelled.values())
    for system, predicted in (("model", {r["image_id"]: r["prediction"] for r in records}),
                              ("baseline_retrieval", {r["image_id"]: r["retrieval"] for r in records}),
                              ("baseline_most_frequent", dict.fromkeys(test_ids, frequent)),
                              ("baseline_label", labelled)):
        assert metrics[system]["CIDEr"] == pytest.approx(cider(test_refs, predicted), rel=1e-9, abs=0), system
        assert metrics[system]["names_object"] == names_object_rate(predicted, test_refs), system
    assert metrics["baseline_retrieval"]["CIDEr"] != metrics["baseline_most_frequent"]["CIDEr"]
    samples = (project / TUXPAINT / "evaluation" / "samples.md").read_text()
    assert samples.count("\n|") >= 5
    for system in ("model", "baseline_retrieval"):                      # bootstrap intervals around the scores
        low, high = metrics["ci95"][system]["CIDEr"]
        assert low <= metrics[system]["CIDEr"] <= high
    gallery = (project / TUXPAINT / "evaluation" / "gallery.html").read_text()
    assert gallery.count("<tr>") == 1 + metrics["test_images"]                    # a header row, then one per image
    assert gallery.count("data:image/png;base64,") == metrics["test_images"] + 2     # and the two charts
    for chart in ("scores.png", "learning_curve.png"):                                  # beside metrics.json
        assert (project / TUXPAINT / chart).read_bytes().startswith(b"\x89PNG"), chart
    assert "<th>label baseline</th>" in gallery and "label baseline" in samples
    curve = (project / TUXPAINT / "training" / "curve.csv").read_text().splitlines()
    assert curve[0] == "epoch,step,train_loss,val_loss,val_CIDEr" and len(curve) == 1 + TINY_PARAMS["train"]["epochs"]


def test_mlflow_holds_run_loss_and_champion(project, registered):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    champion = client.get_model_version_by_alias("clipcap-tuxpaint", "champion")
    challenger = client.get_model_version_by_alias("clipcap-tuxpaint", "challenger")
    assert int(champion.version) == int(challenger.version) == 1
    run = client.get_run(champion.run_id)
    assert "model_CIDEr" in run.data.metrics and "baseline_retrieval_CIDEr" in run.data.metrics
    assert run.data.params["lm.name"] == "tiny-gpt2"
    losses = client.get_metric_history(champion.run_id, "train_loss")
    steps = len((project / TUXPAINT / "training" / "loss.csv").read_text().splitlines()) - 1
    assert len(losses) == steps > 0
    assert len(client.get_metric_history(champion.run_id, "val_CIDEr")) == TINY_PARAMS["train"]["epochs"]
    # the train stage opened this run and logged the learning rate live; register completed the same run
    assert len(client.get_metric_history(champion.run_id, "lr")) == steps
    assert run.data.tags["mlflow.runName"] == "clipcap-tuxpaint-train" and run.data.tags["clipcap.resumed"] == "false"
    summary = json.loads((project / TUXPAINT / "training" / "summary.json").read_text())
    assert summary["mlflow_run"]["run_id"] == champion.run_id
    artifacts = {a.path for a in client.list_artifacts(champion.run_id)}
    assert {"gallery.html", "curve.csv", "scores.png", "learning_curve.png"} <= artifacts, artifacts
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    model_hash = next(o["md5"] for o in lock["train@tuxpaint"]["outs"] if o["path"].endswith("/model"))
    assert json.loads(run.data.tags["clipcap.dvc.train"])["artifacts/tuxpaint/model"] == model_hash  # lineage
    assert run.data.tags["clipcap.warm_start"] == "scratch: no champion yet"
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["tuxpaint-manifest"]


def test_pyfunc_champion_captions_unseen_photos(project, registered, photos):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/clipcap-tuxpaint@champion")
    encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in photos]  # what HTTP clients send
    captions = model.predict(pd.DataFrame({"image": encoded}))
    assert len(captions) == 2 and all(isinstance(c, str) and c.strip() for c in captions), captions
    with pytest.raises(MlflowException, match="does not open file paths"):
        model.predict(pd.DataFrame({"image": photos}))  # a served model opens no client-given path
    local = mlflow.pyfunc.load_model("models:/clipcap-tuxpaint@champion",
                                     model_config={"image_root": str(Path(photos[0]).parent)})
    assert local.predict(pd.DataFrame({"image": photos[:1]})) == captions[:1]  # unless the folder is allowed


def test_test_split_captions_are_non_empty_and_depend_on_the_image(project, registered):
    lines = (project / TUXPAINT / "evaluation" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line)["prediction"] for line in lines]
    assert predictions and all(p.strip() for p in predictions), predictions
    assert len(set(predictions)) >= 2, f"every test image got the same caption: {predictions[0]!r}"


def test_cli_captions_from_registry_uri(project, registered, photos):
    out = _run(["clipcap", "caption", *photos, "--model", "models:/clipcap-tuxpaint@champion"], project)
    lines = [line for line in out.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == photos


def test_second_repro_only_looks_for_new_data(project, registered):
    """fetch always runs (a source folder outside the project is invisible to DVC), hashes nothing it
    has seen, and writes the same table: nothing after it runs."""
    out = _run(["dvc", "repro"], project)
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == ["Running stage 'fetch@tuxpaint':"]
    assert "0 hashed now" in out
    assert _stages_to_rerun(project) == []


def test_the_flow_skips_when_nothing_is_new(project, registered):
    from prefect.testing.utilities import prefect_test_harness

    before = (project / TUXPAINT / "registered.json").read_text()
    with prefect_test_harness(server_startup_timeout=120):
        again = _load_flow_module().retrain(str(project), "tuxpaint")
    assert again == {"dataset": "tuxpaint", "skipped": True, "reason": "nothing new since the last run"}
    assert (project / TUXPAINT / "registered.json").read_text() == before


def _stages_to_rerun(project: Path) -> list[str]:
    """Stages `dvc status` finds out of date, leaving out fetch's 'always changed'."""
    done = subprocess.run(["dvc", "status", "--json"], cwd=project, capture_output=True, text=True, check=True)
    return sorted(stage for stage, why in json.loads(done.stdout).items() if why != ["always changed"])


def test_dvc_plots_show_the_learning_curve_and_the_charts(project, registered):
    done = subprocess.run(["dvc", "plots", "show", "--json"], cwd=project, capture_output=True, text=True, check=True)
    shown = json.loads(done.stdout)["data"]    # plot -> what DVC renders: vega specs, images
    kinds = {plot: [entry["type"] for entry in entries] for plot, entries in shown.items()
             if plot.startswith(str(TUXPAINT))}
    assert kinds == {str(TUXPAINT / "training" / "loss.csv"): ["vega"], str(TUXPAINT / "training" / "curve.csv"): ["vega"],
                     str(TUXPAINT / "scores.png"): ["image"], str(TUXPAINT / "learning_curve.png"): ["image"]}, kinds


@pytest.mark.parametrize(("module", "stages"), [
    ("src/clipcap/data/validate.py", ["validate"]),
    ("src/clipcap/pipeline/metrics.py", ["evaluate", "register", "train"]),  # train: val CIDEr per epoch;
                                                                                # register: a champion re-scored
    ("src/clipcap/pipeline/gallery.py", ["evaluate"]),
    ("src/clipcap/modeling/decode.py", ["evaluate", "register", "train"]),
    ("src/clipcap/training/loop.py", ["train"]),
])
def test_changing_a_module_reruns_exactly_the_stages_that_run_it(project, registered, module, stages):
    path = project / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# touched\n")
        assert _stages_to_rerun(project) == [f"{stage}@tuxpaint" for stage in stages]
    finally:
        path.write_text(original)
    assert _stages_to_rerun(project) == []


def test_a_second_version_is_gated_against_the_champion(project, registered):
    """Other params -> a new version; it becomes challenger, and champion only if its CIDEr is higher."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], project)
    second = json.loads((project / TUXPAINT / "registered.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    first_cider = client.get_run(client.get_model_version("clipcap-tuxpaint", "1").run_id).data.metrics["model_CIDEr"]
    assert second["version"] == 2 and second["previous_champion"] == 1
    assert second["promoted_to_champion"] == (second["value"] > first_cider)
    champion = client.get_model_version_by_alias("clipcap-tuxpaint", "champion")
    assert int(champion.version) == (2 if second["value"] > first_cider else 1)
    assert int(client.get_model_version_by_alias("clipcap-tuxpaint", "challenger").version) == 2


def test_a_champion_from_another_test_set_is_rescored_before_the_gate(project, registered):
    """Another split -> another test set: the register stage downloads the champion, scores it on the new
    test split the way evaluate scores the new model, and gates on that score; the re-score is kept on
    the champion's version and the decision on the new one."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["test_fraction"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], project)
    found = json.loads((project / TUXPAINT / "registered.json").read_text())
    test_set = json.loads((project / TUXPAINT / "metrics.json").read_text())["test_set"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    champion_before = found["previous_champion"]
    rescored = client.get_model_version("clipcap-tuxpaint", str(champion_before)).tags[
        f"clipcap.score.CIDEr.{test_set[:32]}"]
    assert f"of version {champion_before} (re-scored on this test set)" in found["gate"]
    assert f"{float(rescored):.4f}" in found["gate"]
    assert client.get_model_version("clipcap-tuxpaint", str(found["version"])).tags["clipcap.gate"] == found["gate"]


def test_dvc_repro_recovers_from_a_damaged_shard_and_model_file(project, registered):
    """A truncated embedding shard and bit-flipped model weights: the next plain `dvc repro` sets the
    shard aside and encodes its images again, replaces the model, and leaves the pipeline up to date."""
    from clipcap.modeling.captioner import Captioner

    shard = sorted((project / TUXPAINT / "embeddings").rglob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    weights = project / TUXPAINT / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    with pytest.raises(ClipcapError, match="model.safetensors"):
        Captioner.load(project / TUXPAINT / "model")
    _run(["dvc", "repro"], project)
    assert (shard.parent / "damaged" / shard.name).exists()  # set aside for inspection, its images encoded again
    Captioner.load(project / TUXPAINT / "model")  # digests verified on load
    assert _stages_to_rerun(project) == []


def test_mlflow_serves_the_champion_over_http(project, registered, photos):
    """``mlflow models serve`` on the registered champion: base64 images in, captions out; a client path or
    an over-limit param is a 400 with one line and no traceback; SIGTERM stops the server promptly."""
    import os
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/clipcap-tuxpaint@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def post(body: dict) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                time.sleep(0.5)
        encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in photos]
        status, body = post({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]},
                             "params": {"num_beams": 2, "num_captions": 2}})
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == 2 and all(len(c) == 2 for c in predictions)
        for request, expected in (({"dataframe_split": {"columns": ["image"], "data": [[photos[0]]]}},
                                   "image 0: not base64-encoded image bytes"),
                                  ({"dataframe_split": {"columns": ["image"], "data": [[encoded[0]]]},
                                    "params": {"num_beams": 64}}, "serve.max_num_beams")):
            status, body = post(request)
            assert status == 400 and expected in body and "Traceback" not in body and "stack_trace" not in body, body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    assert time.monotonic() - started < 10


def test_a_second_dataset_is_its_own_pipeline_and_new_data_reruns_only_it(project, registered):
    """A user's folder dataset joins params.yaml's datasets: `dvc repro` builds only its stages, into
    artifacts/mine/ and clipcap-mine; a batch in data/mine/ then makes only mine's stages stale."""
    captioned_folder(project / "photos", MINE)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"]["mine"] = MINE_OVERRIDES  # 12 images
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "data" / "mine").mkdir()
    from clipcap.pipeline import STAGES

    stale = _stages_to_rerun(project)
    assert all(stage.endswith("@mine") for stage in stale) and set(stale) >= {f"{s}@mine" for s in STAGES[1:]}, stale
    out = _run(["dvc", "repro"], project)
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'register@mine':" in ran
    assert [line for line in ran if "@tuxpaint" in line] == ["Running stage 'fetch@tuxpaint':"]  # it only looks
    mine = json.loads((project / "artifacts" / "mine" / "registered.json").read_text())
    assert mine["name"] == "clipcap-mine" and mine["promoted_to_champion"] is True
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    tuxpaint = client.get_model_version_by_alias("clipcap-tuxpaint", "champion")
    assert client.get_model_version_by_alias("clipcap-mine", "champion").run_id != tuxpaint.run_id
    captioned_folder(project / "data" / "mine" / "batch-001", ["food/pizza.png", "sports/soccer.png"])
    stale = set(_stages_to_rerun(project)) - {"data.dvc"}  # data/ changed: `dvc add data` records it
    assert "fetch@mine" in stale and all(stage.endswith("@mine") for stage in stale), stale
    _run(["dvc", "add", "-q", "data"], project)
    _run(["dvc", "repro", "register@mine"], project)  # more data, the same recipe: warm-started from the champion
    summary = json.loads((project / "artifacts" / "mine" / "training" / "summary.json").read_text())
    assert summary["warm_start"]["from"] == "models:/clipcap-mine/1", summary["warm_start"]
    assert summary["warm_start"]["epochs"] == len(summary["epochs"]) <= 2  # retrain.epochs, not train.epochs


def test_an_experiment_registers_but_moves_no_alias(project, registered):
    """`dvc exp run -S train.epochs=...` runs the pipeline and registers a version, tagged as the
    experiment's; champion and challenger stay where they were, whatever its score."""
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    before = {alias: client.get_model_version_by_alias("clipcap-tuxpaint", alias).version
              for alias in ("champion", "challenger")}
    for command in (["git", "config", "user.email", "tests@clipcap"], ["git", "config", "user.name", "tests"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        _run(command, project)
    _run(["dvc", "exp", "run", "-n", "two-epochs", "-S", "train.epochs=2", "register@tuxpaint"], project)
    found = json.loads((project / TUXPAINT / "registered.json").read_text())
    assert found["experiment"] == "two-epochs" and found["promoted_to_champion"] is False
    version = client.get_model_version("clipcap-tuxpaint", str(found["version"]))
    assert version.tags["clipcap.experiment"] == "two-epochs"
    assert {alias: client.get_model_version_by_alias("clipcap-tuxpaint", alias).version
            for alias in ("champion", "challenger")} == before

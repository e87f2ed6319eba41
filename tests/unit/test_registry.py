"""Promotion gating against a real MLflow sqlite store and registry."""

import dataclasses
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clipcap.config import ConfigError, RegisterConfig
from clipcap.errors import ClipcapError
from clipcap.pipeline.models import list_versions, promote, rollback
from clipcap.pipeline.registry import GATE_TAG, log_and_register, promotion_lock


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    captioner = tmp_path / "captioner"
    captioner.mkdir()
    (captioner / "config.json").write_text("{}")
    return RegisterConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", metric="CIDEr"), captioner


def _register(cfg, captioner, cider, test_set="test-split-1", rescore=None, experiment=None):
    return log_and_register(cfg, "toy", captioner, {"p": "1"}, {"model_CIDEr": cider, "model_BLEU-4": 0.1},
                            {"train_loss": [(1, 2.0), (2, 1.5)]}, files=[],
                            example_image="x.png", test_set=test_set, rescore=rescore, experiment=experiment)


def _champion(cfg) -> int:
    return int(MlflowClient(cfg.tracking_uri).get_model_version_by_alias("clipcap-toy", "champion").version)


def test_champion_only_moves_when_the_metric_beats_the_champion(store):
    """Strictly better than the CHAMPION: a tie keeps it, and so does beating only the latest version."""
    cfg, captioner = store
    steps = [(0.5, True, None), (0.3, False, 1),   # worse: challenger only
             (0.4, False, 1),                        # beats the latest version (0.3), not the champion (0.5)
             (0.5, False, 1),                        # a tie is not an improvement
             (0.9, True, 1), (0.6, False, 5)]
    for version, (cider, promoted, champion_before) in enumerate(steps, start=1):
        found = _register(cfg, captioner, cider)
        assert (found.version, found.promoted, found.champion_before) == (version, promoted, champion_before), cider
    client = MlflowClient(cfg.tracking_uri)
    assert int(client.get_model_version_by_alias("clipcap-toy", "champion").version) == 5
    assert int(client.get_model_version_by_alias("clipcap-toy", "challenger").version) == 6
    assert os.path.isdir(os.path.join(os.getcwd(), "mlartifacts"))


def test_unknown_gate_metric_names_the_key(store):
    cfg, captioner = store
    bad = RegisterConfig(tracking_uri=cfg.tracking_uri, experiment="t", metric="SPIDEr")
    with pytest.raises(ConfigError, match="register.metric"):
        _register(bad, captioner, 0.5)


def test_a_score_on_another_test_set_never_moves_the_champion(store):
    cfg, captioner = store
    assert _register(cfg, captioner, 0.2, test_set="76 images").promoted
    smoke = _register(cfg, captioner, 3.0, test_set="3 images")  # a far higher CIDEr on 3 images
    assert not smoke.promoted and "another test set" in smoke.reason
    assert _register(cfg, captioner, 0.3, test_set="76 images").promoted
    client = MlflowClient(cfg.tracking_uri)
    assert int(client.get_model_version_by_alias("clipcap-toy", "champion").version) == 3
    assert client.get_run(smoke.run_id).data.tags["clipcap.test_set"] == "3 images"


def test_the_gate_waits_for_a_registration_in_progress(store):
    """Read-register-promote runs under the lock: while another run holds it, nothing is registered."""
    import threading
    import time

    cfg, captioner = store
    _register(cfg, captioner, 0.5)
    done = []
    with promotion_lock(cfg.tracking_uri, "clipcap-toy"):
        worker = threading.Thread(target=lambda: done.append(_register(cfg, captioner, 0.9)))
        worker.start()
        time.sleep(3)
        client = MlflowClient(cfg.tracking_uri)
        assert worker.is_alive() and not done
        assert len(client.search_model_versions("name='clipcap-toy'")) == 1  # the second version waits
    worker.join(timeout=120)
    assert done and done[0].promoted and done[0].version == 2


def test_a_champion_scored_on_another_test_set_is_rescored_on_this_one_first(store):
    """The champion (0.9 on its old test set) scores 0.3 on the new one: a challenger at 0.5 there beats it;
    the re-score is kept on the champion's version (not recomputed) and the decision on the new one."""
    cfg, captioner = store
    _register(cfg, captioner, 0.9, test_set="old split")
    calls = []

    def rescore(uri):
        calls.append(uri)
        return 0.3

    better = _register(cfg, captioner, 0.5, test_set="new split", rescore=rescore)
    assert better.promoted and calls == ["models:/clipcap-toy/1"]
    assert "0.5000 > 0.3000 of version 1 (re-scored on this test set)" in better.reason
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_model_version("clipcap-toy", "2").tags[GATE_TAG] == better.reason
    assert client.get_model_version("clipcap-toy", "1").tags["clipcap.score.CIDEr.new split"] == "0.3"
    # version 2 was scored on "new split" itself: the next challenger needs no re-score
    assert not _register(cfg, captioner, 0.4, test_set="new split", rescore=rescore).promoted
    assert calls == ["models:/clipcap-toy/1"] and _champion(cfg) == 2


def test_later_challengers_on_the_new_test_set_use_the_champion_s_saved_rescore(store):
    """The champion (0.9 on its old split) re-scores 0.6 on the new one and beats the first challenger
    there (0.5), so it stays; the second challenger (0.7) beats its saved re-score, not its old 0.9, and
    the champion is not re-scored again. Test sets are named by 64-hex digests, as the stages name them."""
    cfg, captioner = store
    old_split, new_split = "a" * 64, "b" * 64
    _register(cfg, captioner, 0.9, test_set=old_split)
    calls = []

    def rescore(uri):
        calls.append(uri)
        return 0.6

    first = _register(cfg, captioner, 0.5, test_set=new_split, rescore=rescore)
    assert not first.promoted and first.champion_value == 0.6 and calls == ["models:/clipcap-toy/1"]
    assert "0.5000 <= 0.6000 of version 1 (re-scored on this test set)" in first.reason
    tags = MlflowClient(cfg.tracking_uri).get_model_version("clipcap-toy", "1").tags
    assert tags[f"clipcap.score.CIDEr.{'b' * 32}"] == "0.6"
    second = _register(cfg, captioner, 0.7, test_set=new_split, rescore=rescore)
    assert calls == ["models:/clipcap-toy/1"]                    # the saved re-score, not a second one
    assert second.promoted and second.champion_value == 0.6 and second.champion_before == 1
    assert "0.7000 > 0.6000 of version 1 (re-scored on this test set earlier)" in second.reason
    assert _champion(cfg) == 3
    # the saved re-score belongs to that test set only: on a third one the champion (now 3) is re-scored
    third = _register(cfg, captioner, 0.8, test_set="c" * 64, rescore=lambda uri: calls.append(uri) or 0.75)
    assert third.promoted and calls[1:] == ["models:/clipcap-toy/3"] and third.champion_value == 0.75


def test_a_rescored_champion_that_still_wins_stays(store):
    cfg, captioner = store
    _register(cfg, captioner, 0.9, test_set="old split")
    worse = _register(cfg, captioner, 0.5, test_set="new split", rescore=lambda uri: 0.7)
    assert not worse.promoted and "0.5000 <= 0.7000 of version 1 (re-scored" in worse.reason
    assert _champion(cfg) == 1


def test_a_champion_that_cannot_be_rescored_is_kept_with_the_reason(store):
    cfg, captioner = store
    _register(cfg, captioner, 0.1, test_set="old split")

    def rescore(uri):
        raise ClipcapError(f"{uri} reads open_clip embeddings; this test set was embedded with efficientnet-lite0")

    found = _register(cfg, captioner, 0.9, test_set="new split", rescore=rescore)
    assert not found.promoted and "re-scoring failed" in found.reason and "open_clip" in found.reason
    assert _champion(cfg) == 1


def test_min_delta_asks_for_a_clear_improvement(store):
    cfg, captioner = store
    cfg = dataclasses.replace(cfg, min_delta=0.05)
    _register(cfg, captioner, 0.50)
    small = _register(cfg, captioner, 0.54)
    assert not small.promoted and "+ 0.05" in small.reason
    assert _register(cfg, captioner, 0.56).promoted and _champion(cfg) == 3


def test_manual_promotion_registers_challengers_only_and_promote_moves_the_champion(store):
    cfg, captioner = store
    _register(cfg, captioner, 0.5)
    manual = dataclasses.replace(cfg, promote="manual")
    found = _register(manual, captioner, 0.9)
    assert not found.promoted and "clipcap models promote" in found.reason and _champion(cfg) == 1
    assert "champion before: 1" in promote(manual, "toy", found.version)
    assert _champion(cfg) == 2
    assert "by hand" in MlflowClient(cfg.tracking_uri).get_model_version("clipcap-toy", "2").tags[GATE_TAG]
    with pytest.raises(ClipcapError, match="no version 7"):
        promote(manual, "toy", 7)


def test_an_experiment_registers_a_version_and_moves_no_alias(store):
    """`dvc exp run -S train.epochs=2` beating the champion stays an experiment: no alias moves."""
    cfg, captioner = store
    _register(cfg, captioner, 0.3)
    found = _register(cfg, captioner, 0.9, experiment="lr-sweep-3")
    client = MlflowClient(cfg.tracking_uri)
    assert not found.promoted and _champion(cfg) == 1
    assert int(client.get_model_version_by_alias("clipcap-toy", "challenger").version) == 1
    tags = client.get_model_version("clipcap-toy", str(found.version)).tags
    assert tags["clipcap.experiment"] == "lr-sweep-3" and "clipcap models promote toy 2" in tags[GATE_TAG]
    assert client.get_run(found.run_id).data.tags["clipcap.experiment"] == "lr-sweep-3"


def test_promote_and_rollback_record_who_when_and_why(store):
    cfg, captioner = store
    for cider in (0.3, 0.5, 0.4):  # versions 1 and 2 promoted by the gate, 3 not
        _register(cfg, captioner, cider)
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_model_version("clipcap-toy", "2").tags["clipcap.previous_champion"] == "1"
    assert client.get_model_version("clipcap-toy", "2").tags["clipcap.promoted_by"] == "clipcap register (gate)"
    assert "champion before: 2" in promote(cfg, "toy", 3, reason="reads letters better")
    tags = client.get_model_version("clipcap-toy", "3").tags
    assert "@" in tags["clipcap.promoted_by"] and tags["clipcap.promoted_at"].startswith("20")
    assert tags["clipcap.promoted_why"].endswith(": reads letters better")
    assert rollback(cfg, "toy") == (2, "rolled back from version 3 by hand") and _champion(cfg) == 2
    assert rollback(cfg, "toy")[0] == 1 and _champion(cfg) == 1  # further back, never forth
    with pytest.raises(ClipcapError, match="replaced no earlier champion"):
        rollback(cfg, "toy")
    assert rollback(cfg, "toy", 3, reason="test")[0] == 3
    rows = list_versions(cfg, "toy")
    assert [r.version for r in rows] == [3, 2, 1] and rows[0].aliases == ("challenger", "champion")
    assert rows[0].value == 0.4 and "rolled back from version 1 by hand: test" in rows[0].line("CIDEr")
    with pytest.raises(ClipcapError, match="no version 9"):
        rollback(cfg, "toy", 9)


RACE = Path(__file__).resolve().parents[1] / "jobs" / "register_race.py"


@pytest.mark.pipeline  # 20 registrations in two processes
def test_two_registrations_at_once_always_leave_the_better_champion(tmp_path):
    """2 processes x 10 trials, each registering at the same moment into a fresh store whose champion
    scored 0.3: a better model (0.9) and a worse one (0.5), both better than that champion, so without
    the lock both would read 0.3, both promote, and the last to move the alias would win."""
    import subprocess
    import sys
    import time

    trials = 10
    (tmp_path / "captioner").mkdir()
    (tmp_path / "captioner" / "config.json").write_text("{}")
    for trial in range(trials):
        cfg = RegisterConfig(tracking_uri=f"sqlite:///{tmp_path / str(trial) / 'mlflow.db'}", experiment="race")
        (tmp_path / str(trial)).mkdir()
        _register(cfg, tmp_path / "captioner", 0.3, test_set="one split")
    racers = [subprocess.Popen([sys.executable, str(RACE), str(tmp_path), value, str(trials)], cwd=tmp_path)
              for value in ("0.9", "0.5")]
    for trial in range(trials):
        store = tmp_path / str(trial)
        deadline = time.time() + 300
        while not all((store / f"ready-{v}").exists() for v in ("0.9", "0.5")):
            assert time.time() < deadline and all(r.poll() is None for r in racers), "a racer died"
            time.sleep(0.01)
        (store / "go").touch()
    assert [r.wait(timeout=600) for r in racers] == [0, 0]
    champions = []
    for trial in range(trials):
        client = MlflowClient(f"sqlite:///{tmp_path / str(trial) / 'mlflow.db'}")
        champion = client.get_model_version_by_alias("clipcap-toy", "champion")
        champions.append(client.get_run(champion.run_id).data.metrics["model_CIDEr"])
        assert len(client.search_model_versions("name='clipcap-toy'")) == 3
    assert champions == [0.9] * trials


def test_the_run_carries_lineage_tags_and_its_dataset_input(store):
    import pandas as pd

    cfg, captioner = store
    data = pd.DataFrame({"image_id": ["a", "b"], "split": ["train", "test"], "category": ["x", "y"],
                         "source": ["s", "s"]})
    found = log_and_register(cfg, "toy", captioner, {}, {"model_CIDEr": 0.5}, {}, [], example_image="x.png",
                             tags={"clipcap.git_commit": "abc123", "clipcap.data": "f" * 64}, data=data)
    run = MlflowClient(cfg.tracking_uri).get_run(found.run_id)
    assert run.data.tags["clipcap.git_commit"] == "abc123"
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.name == "toy-manifest" and logged.dataset.digest == "f" * 32
    assert [t.value for t in logged.tags if t.key == "mlflow.data.context"] == ["training"]


def test_a_versions_own_test_captions_are_reused_only_with_the_same_decoding(store, tmp_path):
    """The gate re-scores a champion on a grown test split by captioning only the images its own
    evaluation did not caption: the captions come from its run's predictions.jsonl when its
    metrics.json says they were made with this evaluate.decoding."""
    import json

    from clipcap.config import Config, DecodingConfig, EvaluateConfig, config_to_dict
    from clipcap.pipeline.stages.register import earlier_captions

    cfg, captioner = store
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"decoding": config_to_dict(DecodingConfig())}))
    (evaluation / "predictions.jsonl").write_text(
        "".join(json.dumps({"image_id": i, "prediction": c}) + "\n" for i, c in [("a1", "A cat."), ("b2", "A dog.")]))
    with_files = log_and_register(cfg, "toy", captioner, {"p": "1"}, {"model_CIDEr": 0.5}, {}, example_image="x.png",
                                  files=[evaluation / "metrics.json", evaluation / "predictions.jsonl"])
    without = _register(cfg, captioner, 0.4)
    project = Config(register=cfg)
    assert earlier_captions(with_files.uri, project) == {"a1": "A cat.", "b2": "A dog."}
    assert earlier_captions(without.uri, project) == {}                       # logged before the files were
    other = dataclasses.replace(project, evaluate=EvaluateConfig(decoding=DecodingConfig(num_beams=3)))
    assert earlier_captions(with_files.uri, other) == {}                      # made another way: caption anew


def test_a_project_copied_with_its_store_refuses_to_write_into_the_originals(tmp_path, monkeypatch):
    """MLflow records the artifact folder as an absolute path: a ``cp -a`` copy of a project would log its
    runs and models into the original's mlartifacts/. The copy refuses, naming both folders and the fix."""
    import shutil

    from clipcap.pipeline.registry import connect

    original = tmp_path / "original"
    original.mkdir()
    monkeypatch.chdir(original)
    cfg = RegisterConfig(tracking_uri="sqlite:///mlflow.db", experiment="t")  # the project's own store
    connect(cfg)
    connect(cfg)                                          # the same project again: fine
    shutil.copytree(original, tmp_path / "copy", symlinks=True)
    monkeypatch.chdir(tmp_path / "copy")
    with pytest.raises(ClipcapError) as err:
        connect(cfg)
    message = str(err.value)
    assert f"keeps its runs and models in {(original / 'mlartifacts').resolve()}" in message
    assert str((tmp_path / "copy" / "mlartifacts").resolve()) in message and "\n" not in message
    shared = RegisterConfig(tracking_uri=f"sqlite:///{original / 'mlflow.db'}", experiment="t")
    connect(shared)                                       # naming the original's store on purpose is allowed


def test_a_param_changed_since_training_is_kept_as_a_tag_not_a_failure(store):
    """``dvc repro`` after changing a param only register reads (register.min_delta) re-runs register alone,
    which reopens the training run: MLflow refuses to change a logged param."""
    import mlflow

    cfg, captioner = store
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run() as run:                               # what the train stage logged
        mlflow.log_params({"register.min_delta": "0.0", "train.lr": "0.0003"})
    found = log_and_register(cfg, "toy", captioner, {"register.min_delta": "0.5", "train.lr": "0.0003", "new": "1"},
                             {"model_CIDEr": 0.4}, {}, files=[], example_image="x.png", test_set="t",
                             run_id=run.info.run_id)
    logged = MlflowClient(cfg.tracking_uri).get_run(run.info.run_id).data
    assert found.version == 1
    assert logged.params == {"register.min_delta": "0.0", "train.lr": "0.0003", "new": "1"}
    assert logged.tags["clipcap.param_at_register.register.min_delta"] == "0.5"
    assert not any(k.startswith("clipcap.param_at_register.train") for k in logged.tags)


def test_two_first_runs_creating_the_experiment_at_once_both_go_on(tmp_path, monkeypatch):
    """Two datasets' first scheduled runs each find no experiment and each create it: the second create
    fails in the store (the name is unique), and that run goes on with the experiment the first made."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from clipcap.pipeline.registry import connect

    monkeypatch.chdir(tmp_path)
    cfg = RegisterConfig(tracking_uri="sqlite:///mlflow.db", experiment="shared")
    real_lookup = MlflowClient.get_experiment_by_name
    looked_up = []

    def lookup_before_the_other_run_creates_it(self, name):
        looked_up.append(name)
        if len(looked_up) == 1:                       # the other run creates it just after this look-up
            MlflowClient().create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
            return None
        return real_lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lookup_before_the_other_run_creates_it)
    client = connect(cfg)
    assert looked_up == ["shared", "shared"]
    assert [e.name for e in client.search_experiments()].count("shared") == 1
    with mlflow.start_run() as run:                   # the run logs into it
        pass
    assert client.get_experiment(run.info.experiment_id).name == "shared"

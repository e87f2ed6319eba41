"""Promotion gating against a real MLflow sqlite store and registry."""

import os

import pytest
from mlflow.tracking import MlflowClient

from clipcap.config import ConfigError, RegisterConfig
from clipcap.pipeline.registry import log_and_register, promotion_lock


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    captioner = tmp_path / "captioner"
    captioner.mkdir()
    (captioner / "config.json").write_text("{}")
    return RegisterConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", metric="CIDEr"), captioner


def _register(cfg, captioner, cider, test_set="test-split-1"):
    return log_and_register(cfg, "toy", captioner, {"p": "1"}, {"model_CIDEr": cider, "model_BLEU-4": 0.1},
                            {"train_loss": [(1, 2.0), (2, 1.5)]}, files=[],
                            example_image="x.png", test_set=test_set)


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

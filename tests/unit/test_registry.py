"""Promotion gating against a real MLflow sqlite store and registry."""

import os

import pytest
from mlflow.tracking import MlflowClient

from clipcap.config import ConfigError, RegisterConfig
from clipcap.pipeline.registry import log_and_register


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    captioner = tmp_path / "captioner"
    captioner.mkdir()
    (captioner / "config.json").write_text("{}")
    return RegisterConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", metric="CIDEr"), captioner


def _register(cfg, captioner, cider):
    return log_and_register(cfg, "toy", captioner, {"p": "1"}, {"model_CIDEr": cider, "model_BLEU-4": 0.1},
                            [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], files=[],
                            example_image="x.png")


def test_champion_only_moves_when_the_metric_improves(store):
    cfg, captioner = store
    first = _register(cfg, captioner, 0.5)
    second = _register(cfg, captioner, 0.3)
    third = _register(cfg, captioner, 0.9)
    assert (first.version, first.promoted) == (1, True)
    assert (second.version, second.promoted, second.champion_before) == (2, False, 1)
    assert (third.version, third.promoted, third.champion_before) == (3, True, 1)
    client = MlflowClient(cfg.tracking_uri)
    assert int(client.get_model_version_by_alias("clipcap-toy", "champion").version) == 3
    assert int(client.get_model_version_by_alias("clipcap-toy", "challenger").version) == 3
    assert os.path.isdir(os.path.join(os.getcwd(), "mlartifacts"))


def test_unknown_gate_metric_names_the_key(store):
    cfg, captioner = store
    bad = RegisterConfig(tracking_uri=cfg.tracking_uri, experiment="t", metric="SPIDEr")
    with pytest.raises(ConfigError, match="register.metric"):
        _register(bad, captioner, 0.5)

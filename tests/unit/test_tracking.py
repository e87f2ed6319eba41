"""The training run in a real MLflow sqlite store: step and epoch metrics arrive while training runs,
a failed training leaves a FAILED run, and the register stage completes the finished one."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from clipcap.config import config_from_dict
from clipcap.pipeline.tracking import reusable_run, training_run


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return config_from_dict({"register": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"},
                             "datasets": {"toy": {}}})


def test_metrics_are_in_the_store_before_training_ends(cfg):
    client = MlflowClient(cfg.register.tracking_uri)
    with training_run(cfg, {"clipcap.warm_start": "scratch: test"}) as live:
        for step in range(1, 46):
            live.on_step({"step": step, "epoch": 1, "loss": 3.0 - step / 100, "lr": 1e-3})
        live.on_epoch_end({"epoch": 1, "step": 45, "train_loss": 2.8, "val_loss": 2.5, "val_CIDEr": 0.4})
        during = client.get_run(live.run_id)
        assert during.info.status == "RUNNING"
        assert len(client.get_metric_history(live.run_id, "train_loss")) == 45  # flushed at the epoch's end
        assert [m.step for m in client.get_metric_history(live.run_id, "val_CIDEr")] == [45]
        live.on_step({"step": 46, "epoch": 2, "loss": 2.0, "lr": 5e-4})
    done = client.get_run(live.run_id)
    assert done.info.status == "FINISHED"
    assert len(client.get_metric_history(live.run_id, "lr")) == 46  # the rest sent when the run ends
    assert done.data.params["train.lr"] == str(cfg.train.lr) and done.data.tags["clipcap.warm_start"] == "scratch: test"
    assert reusable_run(live.describe(), cfg.register.tracking_uri) == live.run_id
    assert reusable_run(live.describe(), "sqlite:///elsewhere.db") is None
    assert reusable_run(None, cfg.register.tracking_uri) is None


def test_a_failed_training_leaves_a_failed_run_that_is_not_reused(cfg):
    with pytest.raises(RuntimeError, match="out of memory"):
        with training_run(cfg) as live:
            live.on_step({"step": 1, "epoch": 1, "loss": 3.0, "lr": 1e-3})
            raise RuntimeError("out of memory")
    assert MlflowClient(cfg.register.tracking_uri).get_run(live.run_id).info.status == "FAILED"
    assert reusable_run(live.describe(), cfg.register.tracking_uri) is None

"""One side of a promotion race: ``python register_race.py STORES VALUE TRIALS`` logs a model scored
VALUE into each trial's store (STORES/<trial>/mlflow.db), then registers it - the gated step - as soon
as STORES/<trial>/go exists, so two of these started together reach the gate at the same moment."""

import sys
import time
from pathlib import Path

import mlflow

from clipcap.config import RegisterConfig
from clipcap.pipeline.registry import TEST_SET_TAG, connect, register_version

stores, value, trials = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
for trial in range(trials):
    store = stores / str(trial)
    cfg = RegisterConfig(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", experiment="race", metric="CIDEr")
    connect(cfg)
    with mlflow.start_run() as run:
        mlflow.log_metric("model_CIDEr", value)
        mlflow.set_tag(TEST_SET_TAG, "one split")
        mlflow.log_text("a model", "model/MLmodel")
    (store / f"ready-{value}").touch()
    while not (store / "go").exists():
        time.sleep(0.002)
    register_version(cfg, "clipcap-toy", f"runs:/{run.info.run_id}/model", run.info.run_id, value, "one split")

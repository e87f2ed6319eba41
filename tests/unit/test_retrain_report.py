"""What a retraining run publishes (the Prefect artifact): metrics against the baselines and the
champion, the gate decision, where the gallery is."""

from __future__ import annotations

from pathlib import Path

from clipcap.pipeline.reports import gallery_link, retrain_report

METRICS = {"model": {"BLEU-4": 0.21, "CIDEr": 1.31, "SPICE": None},
           "baseline_retrieval": {"BLEU-4": 0.24, "CIDEr": 1.40, "SPICE": None},
           "baseline_most_frequent": {"BLEU-4": 0.0, "CIDEr": 0.02, "SPICE": None}, "test_images": 80}
REGISTERED = {"name": "clipcap-toy", "version": 3, "metric": "CIDEr", "value": 1.31, "champion_value": 1.25,
              "previous_champion": 2, "promoted_to_champion": True, "gate": "CIDEr 1.3100 > 1.2500 of version 2",
              "model_uri": "models:/clipcap-toy/3", "run_id": "abc", "tracking_uri": "sqlite:///mlflow.db"}


def test_the_report_puts_the_run_beside_baselines_and_champion():
    text = retrain_report(REGISTERED, METRICS, "[gallery](x)")
    assert "| system | BLEU-4 | CIDEr |" in text  # SPICE unavailable: no column
    assert "| this run | 0.2100 | 1.3100 |" in text
    assert "| retrieval baseline | 0.2400 | 1.4000 |" in text
    assert "| champion before (version 2) | 1.2500 |" in text
    assert "**Gate: promoted to champion.** CIDEr 1.3100 > 1.2500 of version 2" in text
    assert "Test split: 80 images." in text and "[gallery](x)" in text


def test_a_first_version_has_no_champion_to_compare():
    first = REGISTERED | {"version": 1, "previous_champion": None, "champion_value": None, "gate": "no champion yet"}
    assert "| champion before (version -) | - |" in retrain_report(first, METRICS, "g")


def test_the_gallery_link_opens_in_the_tracking_server_when_there_is_one(tmp_path):
    served = REGISTERED | {"tracking_uri": "http://127.0.0.1:5000/", "experiment_id": "7"}
    assert gallery_link(served, tmp_path / "g.html") == \
        "[gallery.html](http://127.0.0.1:5000/#/experiments/7/runs/abc/artifacts/gallery.html)"
    local = gallery_link(REGISTERED, Path(tmp_path / "g.html"))
    assert local.startswith("[g.html](file://") and "runs:/abc/gallery.html" in local

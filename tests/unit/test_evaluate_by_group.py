"""Per-group scores (the nocaps domains) and how the summary shows them."""

from __future__ import annotations

import json

import clipcap.pipeline.baselines as baselines
from clipcap.pipeline.metrics import CaptionScores
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.reports import summary


def test_score_by_group_scores_each_group_on_its_own_images(monkeypatch):
    seen = []

    def fake_score(references, predictions, bootstrap, meteor=None):
        seen.append(sorted(predictions))
        exact = sum(predictions[i] in references[i] for i in predictions) / len(predictions)
        return CaptionScores({"CIDEr": exact}, {})

    monkeypatch.setattr(baselines, "score_captions", fake_score)
    references = {"a": ["A cat."], "b": ["A dog."], "c": ["A car."], "d": ["A bus."]}
    systems = {"model": {"a": "A cat.", "b": "A cow.", "c": "A car.", "d": "A car."},
               "baseline": {i: "A cat." for i in references}}
    groups = {"a": "in-domain", "b": "in-domain", "c": "out-domain"}  # d has no domain: left out
    scores = baselines.score_by_group(references, systems, groups)
    assert list(scores) == ["in-domain", "out-domain"]
    assert scores["in-domain"] == {"images": 2, "model": {"CIDEr": 0.5}, "baseline": {"CIDEr": 0.5}}
    assert scores["out-domain"] == {"images": 1, "model": {"CIDEr": 1.0}, "baseline": {"CIDEr": 0.0}}
    assert seen == [["a", "b"], ["a", "b"], ["c"], ["c"]]


def test_summary_shows_domains_without_breaking_the_table(tmp_path):
    scores = {"BLEU-4": 0.1, "CIDEr": 0.5, "SPICE": None}
    metrics = {"model": scores, "baseline_retrieval": scores, "test_images": 3, "spice": "unavailable",
               "by_domain": {"in-domain": {"images": 2, "model": {**scores, "CIDEr": 0.7}, "baseline_retrieval": scores},
                             "out-domain": {"images": 1, "model": {**scores, "CIDEr": 0.2}, "baseline_retrieval": scores}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    text = summary(Layout(tmp_path))
    assert not any(line.startswith("by_domain") for line in text.splitlines())
    assert "model CIDEr by domain: in-domain 0.700 (2 images), out-domain 0.200 (1 images)" in text

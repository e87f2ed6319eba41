"""Caption metrics: per-image scores and bootstrap intervals (real pycocoevalcap scorers, Java METEOR)."""

from __future__ import annotations

import pytest

from clipcap.pipeline.metrics import score_captions

REFS = {f"img{i}": [f"A drawing of a {w}.", f"The {w} in a picture."]
        for i, w in enumerate(["cat", "dog", "car", "tree", "boat", "house", "apple", "bird", "fish", "star"])}


@pytest.fixture(scope="module")
def scores():
    # half the captions right, half about something else: a spread the bootstrap can see
    words = ["cat", "dog", "car", "tree", "boat", "kite", "pear", "moon", "shoe", "lamp"]
    return score_captions(REFS, {i: f"A drawing of a {w}." for i, w in zip(REFS, words)}, bootstrap=500)


def test_per_image_scores_add_up_to_the_corpus_score(scores):
    assert set(scores.per_image) == set(REFS)
    mean = sum(s["CIDEr"] for s in scores.per_image.values()) / len(REFS)
    assert mean == pytest.approx(scores.corpus["CIDEr"])
    right, wrong = scores.per_image["img0"], scores.per_image["img9"]
    assert right["CIDEr"] > wrong["CIDEr"] and right["BLEU-4"] > wrong["BLEU-4"] and right["METEOR"] > wrong["METEOR"]


def test_bootstrap_intervals_bracket_the_score_and_have_width(scores):
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        low, high = scores.ci95[name]
        assert low <= scores.corpus[name] <= high, name
        assert high - low > 0.05, name           # ten images, half wrong: the interval is wide
    assert set(scores.ci95) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def test_bootstrap_is_seeded():
    predictions = {i: "A drawing of a cat." for i in REFS}
    first = score_captions(REFS, predictions, bootstrap=200, seed=3).ci95
    assert first == score_captions(REFS, predictions, bootstrap=200, seed=3).ci95

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
    """The same seed draws the same resamples; another seed other ones (so the seed is not ignored).
    Per-image scores of many sizes: with few distinct ones, two seeds' percentiles could coincide."""
    from clipcap.pipeline.baselines import _meteor

    words = ["cat", "dog", "car", "tree", "boat", "kite", "pear", "moon", "shoe", "lamp"]
    predictions = {i: f"A {'drawing of a ' * (n % 3)}{w} {'in a picture' if n % 2 else ''}."
                   for n, (i, w) in enumerate(zip(REFS, words))}
    meteor = _meteor()   # one Java process for the three scorings
    first = score_captions(REFS, predictions, bootstrap=200, seed=3, meteor=meteor).ci95
    assert first == score_captions(REFS, predictions, bootstrap=200, seed=3, meteor=meteor).ci95
    other = score_captions(REFS, predictions, bootstrap=200, seed=4, meteor=meteor).ci95
    assert first.keys() == other.keys() and all(first[name] != other[name] for name in ("BLEU-4", "CIDEr"))


def test_bleu_from_summed_statistics_is_pycocoevalcaps_corpus_bleu():
    """The bootstrap sums each image's BLEU counts per resample (all resamples at once): summed over
    any multiset of images, they give exactly what pycocoevalcap's scorer gives for it."""
    import numpy as np
    from pycocoevalcap.bleu.bleu import Bleu

    from clipcap.pipeline.metrics import bleu_statistics, corpus_bleu

    predictions = {i: c for i, c in zip(REFS, ["a drawing of a cat", "the dog", "a red car in a picture", "tree",
                                                "a boat a boat a boat", "house of cards", "an apple", "a bird .",
                                                "fish", "the star in a picture of the night sky"])}
    gts = {i: [r.lower().rstrip(".") for r in refs] for i, refs in REFS.items()}
    res = {i: [predictions[i]] for i in REFS}
    ids = sorted(REFS)
    stats = bleu_statistics(ids, gts, res)
    for sample in (ids, ids[:3], [ids[0], ids[0], ids[4], ids[9]]):
        expected, _ = Bleu(4).compute_score({f"{n}": gts[i] for n, i in enumerate(sample)},
                                            {f"{n}": res[i] for n, i in enumerate(sample)}, verbose=0)
        found = corpus_bleu(stats[[ids.index(i) for i in sample]].sum(axis=0))
        assert np.allclose(found, expected, rtol=1e-12, atol=0), sample


def test_one_metric_alone_equals_the_full_scoring(scores):
    from clipcap.pipeline.metrics import corpus_metric

    words = ["cat", "dog", "car", "tree", "boat", "kite", "pear", "moon", "shoe", "lamp"]
    predictions = {i: f"A drawing of a {w}." for i, w in zip(REFS, words)}
    assert corpus_metric(REFS, predictions, "CIDEr") == scores.corpus["CIDEr"]
    assert corpus_metric(REFS, predictions, "BLEU-4") == scores.corpus["BLEU-4"]

"""Caption metrics with the pycocoevalcap scorers: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and
SPICE when its Stanford CoreNLP jars are present (it cannot download them offline).

``COCOEvalCap.evaluate()`` always constructs SPICE, so the scorers are called directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def spice_available() -> bool:
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*.jar"))


def cider(references: dict[str, list[str]], predictions: dict[str, str]) -> float:
    """CIDEr alone (no Java METEOR): cheap enough to follow training epoch by epoch."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": c or "."}] for i, c in predictions.items()})
    return float(Cider().compute_score(gts, res)[0])


def corpus_metric(references: dict[str, list[str]], predictions: dict[str, str], metric: str) -> float:
    """One corpus metric of :func:`score_captions`, alone where it can be: CIDEr without METEOR's Java start."""
    if metric == "CIDEr":
        return cider(references, predictions)
    value = score_captions(references, predictions, bootstrap=0).corpus[metric]
    if value is None:
        raise ValueError(f"{metric} cannot be computed here")
    return value


@dataclass
class CaptionScores:
    """One system's scores on a test set: corpus metrics, each image's own, and bootstrap intervals."""

    corpus: dict[str, float | None]            # BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (None: unavailable)
    per_image: dict[str, dict[str, float]]     # image id -> metric -> value
    ci95: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high]


def score_captions(references: dict[str, list[str]], predictions: dict[str, str], bootstrap: int = 1000,
                   seed: int = 0, meteor=None) -> CaptionScores:
    """Scores of ``predictions`` (one caption per id) against ``references``.

    Per image: sentence BLEU, METEOR, ROUGE-L and CIDEr (CIDEr's document frequencies come from
    the whole test set, as for the corpus score). ``ci95``: the 2.5th and 97.5th percentiles of
    each metric over ``bootstrap`` resamples of the test images (with replacement, seeded):
    corpus BLEU is recomputed on each resample; for METEOR, ROUGE-L and CIDEr the resample's mean
    per-image score is used (CIDEr and ROUGE-L corpus scores are that mean; METEOR's is close to it).
    SPICE is ``None`` when it cannot run here. ``meteor``: a running METEOR scorer to use (its Java
    process takes ~10 s to start and 0.2 s a test split after; :func:`score_systems` shares one).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} predictions (first: {missing[0]})")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i] or "."}] for i in ids})
    corpus: dict[str, float | None] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"BLEU-{n + 1}"] = float(bleu[n])
        for i, value in zip(ids, bleu_each[n]):
            per_image[i][f"BLEU-{n + 1}"] = float(value)
    meteor = meteor or Meteor()  # a Java subprocess, stopped when the scorer is garbage-collected
    for name, scorer in (("METEOR", meteor), ("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        total, each = scorer.compute_score(gts, res)
        corpus[name] = float(total)
        for i, value in zip(ids, each):
            per_image[i][name] = float(value)
    corpus["SPICE"] = None
    if spice_available():
        try:
            from pycocoevalcap.spice.spice import Spice

            corpus["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as err:  # SPICE is optional: report, never crash the evaluation
            log.warning("SPICE failed, reported as unavailable: %s", err)
    ci95 = _bootstrap(ids, gts, res, per_image, bootstrap, seed) if bootstrap and len(ids) > 1 else {}
    return CaptionScores(corpus, per_image, ci95)


def bleu_statistics(ids, gts, res) -> np.ndarray:
    """Each image's BLEU counts as corpus BLEU sums them, shape (images, 10): hypothesis length, closest
    reference length, then n-grams guessed and correct for n = 1..4 (pycocoevalcap's own counting)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    rows = []
    for i in ids:
        scorer = BleuScorer(res[i][0], gts[i], n=4)
        found = scorer.ctest[0]   # its "reflen" is every reference's length: the closest counts (ties: the shorter)
        reference = min(found["reflen"], key=lambda length: (abs(length - found["testlen"]), length))
        rows.append([found["testlen"], reference, *found["guess"], *found["correct"]])
    return np.array(rows, dtype=np.float64)


def corpus_bleu(totals: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from summed :func:`bleu_statistics` (..., 10) -> (..., 4), as ``BleuScorer.compute_score``
    computes them (the geometric mean of the n-gram precisions up to n, times the brevity penalty)."""
    tiny, small = 1e-15, 1e-9
    precision = (totals[..., 6:10] + tiny) / (totals[..., 2:6] + small)
    bleu = np.cumprod(precision, axis=-1) ** (1.0 / np.arange(1, 5))
    ratio = (totals[..., 0] + tiny) / (totals[..., 1] + small)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleu * penalty[..., None]


def _bootstrap(ids, gts, res, per_image, rounds: int, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(ids), size=(rounds, len(ids)))
    means = {name: np.array([[per_image[i][name] for i in ids]]) for name in ("METEOR", "ROUGE-L", "CIDEr")}
    bleu = corpus_bleu(bleu_statistics(ids, gts, res)[samples].sum(axis=1))   # every resample at once
    draws: dict[str, list[float]] = {f"BLEU-{n + 1}": bleu[:, n].tolist() for n in range(4)}
    for name, values in means.items():
        draws[name] = values[0][samples].mean(axis=1).tolist()
    return {name: [round(float(np.percentile(v, 2.5)), 6), round(float(np.percentile(v, 97.5)), 6)]
            for name, v in draws.items()}

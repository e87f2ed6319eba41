"""Caption metrics with the pycocoevalcap scorers: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and
SPICE when its Stanford CoreNLP jars are present (it cannot download them offline).

``COCOEvalCap.evaluate()`` always constructs SPICE, so the scorers are called directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def spice_available() -> bool:
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*.jar"))


def score_captions(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float | None]:
    """Corpus scores of ``predictions`` (one caption per id) against ``references``.

    SPICE is ``None`` when it cannot run here.
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
    scores: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    meteor = Meteor()  # a Java subprocess, stopped when the scorer is garbage-collected
    scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    del meteor
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["SPICE"] = None
    if spice_available():
        try:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as err:  # SPICE is optional: report, never crash the evaluation
            log.warning("SPICE failed, reported as unavailable: %s", err)
    return scores

"""Evaluation on the test split: the model and two baselines scored the same way.

- ``most_frequent``: the most frequent training caption, for every image.
- ``retrieval``: the caption of the nearest training image by cosine similarity of the
  image embeddings (a strong baseline when the data has near-duplicates).

:func:`score_by_group` scores the same systems per value of a manifest column (the nocaps
``domain``: in-, near- and out-of-domain).
"""

from __future__ import annotations

from collections import Counter

import torch

from clipcap.modeling.retrieval import CaptionDatastore
from clipcap.pipeline.metrics import CaptionScores, score_captions


def most_frequent_caption(train_captions: list[list[str]]) -> str:
    counts = Counter(c for captions in train_captions for c in captions)
    if not counts:
        raise ValueError("no training captions: the train split is empty")
    return counts.most_common(1)[0][0]


def retrieval_captions(train_embeddings: torch.Tensor, train_captions: list[list[str]],
                       query_embeddings: torch.Tensor) -> list[str]:
    """The first caption of the nearest training image: the search a retrieval-augmented captioner makes."""
    datastore = CaptionDatastore.of_images(train_embeddings, train_captions, [str(i) for i in range(len(train_captions))])
    return [found[0] for found in datastore.nearest(query_embeddings, 1)]


def score_systems(references: dict[str, list[str]], systems: dict[str, dict[str, str]],
                  bootstrap: int = 1000, meteor=None) -> dict[str, CaptionScores]:
    """Scores of each named system's predictions ({image id: caption}), with one METEOR process for all
    (``meteor``, or one started here: its Java start is most of the scoring time)."""
    meteor = meteor or _meteor()
    return {name: score_captions(references, predictions, bootstrap=bootstrap, meteor=meteor)
            for name, predictions in systems.items()}


def score_by_group(references: dict[str, list[str]], systems: dict[str, dict[str, str]],
                   groups: dict[str, str]) -> dict[str, dict]:
    """Scores of each system on each group of images (``groups``: image id -> group, e.g. the nocaps
    domain), as ``{group: {"images": n, system: scores}}``; ids without a group are left out.

    Each group is scored on its own (CIDEr's document frequencies come from that group), the
    way nocaps reports in-, near- and out-of-domain results.
    """
    out: dict[str, dict] = {}
    meteor = _meteor()
    for group in sorted(set(groups.values())):
        ids = [i for i, g in groups.items() if g == group]
        scores = score_systems({i: references[i] for i in ids}, {name: {i: p[i] for i in ids} for name, p in systems.items()},
                               bootstrap=0, meteor=meteor)
        out[group] = {"images": len(ids), **{name: s.corpus for name, s in scores.items()}}
    return out


def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()   # a Java subprocess, stopped when the scorer is garbage-collected

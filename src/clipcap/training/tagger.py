"""A tagger for the dataset's own vocabulary: one sigmoid per noun of the training captions, fitted in
seconds on the image embeddings (full-batch, like the learned retrieval space), stored with the captioner
as its entity head (:mod:`clipcap.modeling.entities`, source ``tagger``)."""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F

from clipcap.modeling.entities import EntityHead, EntitySettings

log = logging.getLogger(__name__)


def noun_vocabulary(nouns_per_image: list[set[str]], min_images: int = 2, limit: int = 2000) -> list[str]:
    """The nouns of at least ``min_images`` images, the most frequent first, at most ``limit``."""
    counts = Counter(noun for nouns in nouns_per_image for noun in nouns)
    return [noun for noun, count in counts.most_common(limit) if count >= min_images]


def fit_tagger(embeddings: torch.Tensor, nouns_per_image: list[set[str]], *, min_images: int = 2,
               steps: int = 300, top_k: int = 3, threshold: float = 0.5, seed: int = 0,
               weight_decay: float = 1e-3) -> EntityHead | None:
    """A multi-label linear tagger of the training images' nouns (None when no noun is on ``min_images``
    images): inputs are the unit-normalised embeddings less their mean, then unit-normalised again."""
    vocabulary = noun_vocabulary(nouns_per_image, min_images)
    if not vocabulary:
        return None
    index = {noun: i for i, noun in enumerate(vocabulary)}
    targets = torch.zeros(len(embeddings), len(vocabulary))
    for row, nouns in enumerate(nouns_per_image):
        for noun in nouns:
            if noun in index:
                targets[row, index[noun]] = 1.0
    unit = F.normalize(embeddings.float(), dim=-1)
    center = unit.mean(dim=0)
    x = F.normalize(unit - center, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(len(vocabulary), x.shape[1], generator=generator) * 0.01).requires_grad_()
    positive = targets.mean(dim=0).clamp(1e-4, 1 - 1e-4)
    bias = torch.log(positive / (1 - positive)).clone().requires_grad_()   # start at each noun's base rate
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    scale = 10.0   # unit inputs: logits of a useful range need weights of norm ~10, reached in few steps this way
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight.T * scale + bias, targets)
        (loss + weight_decay * weight.pow(2).sum()).backward()
        optimizer.step()
    log.info("entity tagger: %d nouns of %d training images, loss %.4f", len(vocabulary), len(embeddings), loss.item())
    settings = EntitySettings("tagger", vocabulary, "sigmoid", 1.0, True, top_k, threshold)
    return EntityHead(settings, (weight.detach() * scale), bias.detach(), center)

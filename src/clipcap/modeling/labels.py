"""What an image encoder can name by itself: its own classifier over the embeddings the store holds.

EfficientNet-Lite0's ImageNet head is one linear layer over the same pooled features the embedding store
keeps, so :class:`EncoderLabels` names an embedding's likeliest ImageNet categories (torchvision's names)
without encoding the image again: skimage's cat -> "Egyptian cat" 0.79, its coffee -> "espresso" 0.65.
:func:`label_caption` turns a label into the "label" baseline's caption ("An Egyptian cat.").

An encoder without a classifier (open_clip towers) has none here: :func:`encoder_labels` returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clipcap.modeling.encoders import EfficientNetLite0, ImageEncoder

AN_EXCEPTIONS = ("uni", "use", "usu", "eu", "one", "ewe")   # a unicycle, a European: a vowel letter, a consonant sound
A_EXCEPTIONS = ("hour", "honest", "honour", "honor", "heir")  # an hour: a silent h


@dataclass(frozen=True)
class Label:
    name: str
    probability: float


class EncoderLabels(nn.Module):
    """A classifier head over image embeddings, with the names of its classes."""

    def __init__(self, names: list[str], head: nn.Linear) -> None:
        super().__init__()
        if head.out_features != len(names):
            raise ValueError(f"a head of {head.out_features} classes for {len(names)} names")
        self.names, self.head = list(names), head

    @torch.inference_mode()
    def top(self, embeddings: torch.Tensor, k: int = 3) -> list[list[Label]]:
        """The ``k`` likeliest labels of each embedding, likeliest first, with their softmax probabilities."""
        probabilities = self.head(embeddings.to(self.head.weight)).softmax(dim=-1)
        found = probabilities.topk(min(k, len(self.names)), dim=-1)
        return [[Label(self.names[i], float(p)) for p, i in zip(values, indices)]
                for values, indices in zip(found.values.tolist(), found.indices.tolist())]


def encoder_labels(encoder: ImageEncoder) -> EncoderLabels | None:
    """The encoder's own classifier (EfficientNet-Lite0: its ImageNet head; random weights for a random
    encoder), or None when it has none."""
    if not isinstance(encoder, EfficientNetLite0):
        return None
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return EncoderLabels(list(_IMAGENET_CATEGORIES), encoder.net._fc).eval()


def article(noun: str) -> str:
    lower = noun.lower()
    if lower.startswith(A_EXCEPTIONS):
        return "An"
    if lower[:1] in "aeiou" and not lower.startswith(AN_EXCEPTIONS):
        return "An"
    return "A"


def label_caption(label: str) -> str:
    """``"Egyptian cat"`` -> ``"An Egyptian cat."``: the caption of the "label" baseline."""
    return f"{article(label)} {label}."

"""Entities: the objects an image shows, named in words, for the captioner's hard prompt (after ViECap,
Fei et al., ICCV 2023): "Objects: cat, cup." beside the soft image prefix and the retrieved captions.

A captioner trained this way copies an entity it is given, so it can name what its datastore has never
held. In training the entities are the nouns of the image's own caption, each dropped at random
(:mod:`clipcap.training.batches`); at inference an :class:`EntityHead` names them from the image
embedding. Every source is the same thing: a linear layer over the embedding and one everyday noun per
output class, stored with the captioner (``entities.safetensors`` + the ``entities`` section of its
``config.json``):

- ``classifier``: the encoder's own classifier (EfficientNet-Lite0's ImageNet head), its 1,000 classes
  mapped to everyday nouns (``imagenet_nouns.json``: tabby -> cat, espresso -> coffee); the softmax
  probabilities of the classes of one noun are summed, and so are those of the classes a general noun
  gathers (``general``: person <- military uniform, suit, scuba diver; building <- stupa, palace), so a
  photo of a person, a class ImageNet lacks, is named from what the person wears;
- ``zero_shot``: an open_clip model's text tower over a vocabulary (:func:`zero_shot_head`): the
  vocabulary's text embeddings, a prompt ensemble per noun, are the layer; softmax at a low temperature;
- ``tagger``: a multi-label layer fitted in seconds to the training captions' nouns
  (:mod:`clipcap.training.tagger`): the dataset's own vocabulary; a sigmoid per noun.

A noun is kept when its probability is at least ``threshold``, the ``top_k`` likeliest first.

Beside a datastore, the retrieved captions name what is like the image; for an image like nothing the
datastore holds they name something else, and the captioner copies them rather than the entities. So an
image is novel (:func:`novel_images`) when its nearest entry is less similar (the encoder's cosine) than
``novel_similarity`` - the ``entities.novel_quantile`` of the training images' own nearest-neighbour
similarities - or when, less similar than ``familiar_similarity`` (the ``entities.familiar_quantile`` of
them), the head is at least ``novel_confidence`` sure of a noun that none of its retrieved captions names
(a new kind of thing among familiar-looking ones: a stamp of a food among stamps of toys). A novel image's
prompt holds its entities alone - at least the likeliest noun - as a share ``novel_quantile`` of the
training prompts did. Closer than ``familiar_similarity`` the neighbours are trusted whatever the head
says: on clip art an ImageNet head is often sure and wrong (a coin: "face powder").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipcap.fileio import atomic_path
from clipcap.naming import lemma, words

ENTITIES_FILE = "entities.safetensors"
ACTIVATIONS = ("softmax", "sigmoid")
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.",
             "a clip art of a {}.", "a close-up photo of a {}.", "itap of a {}.")  # zero-shot prompt ensemble


@dataclass(frozen=True)
class EntitySettings:
    """What a head is and how it chooses (the ``entities`` section of a captioner's config.json)."""

    source: str                       # classifier | zero_shot | tagger
    nouns: list[str]                  # the everyday noun of each output class (several classes may share one)
    activation: str = "softmax"       # softmax over the classes | sigmoid per class
    temperature: float = 1.0          # logits are divided by it
    normalize: bool = False           # unit-normalise the embedding first (after subtracting ``center`` if stored)
    top_k: int = 3
    threshold: float = 0.2
    novel_similarity: float | None = None  # with a datastore: an image whose nearest entry is less similar is novel
    novel_confidence: float | None = None  # with a datastore: so is one less similar than ``familiar_similarity``
    familiar_similarity: float | None = None  # whose likeliest noun is at least ``novel_confidence`` probable and
                                              # named by none of its retrieved captions
    in_prompt: str = "all"            # with a datastore: which images' prompts name their entities: all | novel
    general: dict[str, list[int]] = field(default_factory=dict)  # softmax: a general noun -> the classes it
                                                                  # gathers (beside each class's own noun)
    kinds: dict[str, list[str]] = field(default_factory=dict)  # a noun -> words naming it more broadly or more
                                                               # narrowly (plane: aircraft; person: girl)
    vocabulary: list[str] = field(default_factory=list)  # the distinct nouns, in order (derived)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"entities.activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.general and self.activation != "softmax":
            raise ValueError("entities.general needs a softmax head (its classes' probabilities are added)")
        for noun, classes in self.general.items():
            if not classes or not all(0 <= c < len(self.nouns) for c in classes):
                raise ValueError(f"entities.general {noun!r}: classes must be among the head's {len(self.nouns)}")
        object.__setattr__(self, "vocabulary", list(dict.fromkeys([*self.nouns, *self.general])))

    def as_config(self) -> dict:
        """The settings as config.json holds them (``vocabulary`` is derived, not stored)."""
        settings = asdict(self)
        settings.pop("vocabulary")
        return settings


@dataclass(frozen=True)
class Named:
    """What an entity head names in one image."""

    entities: list[str]   # the nouns at least ``threshold`` probable, likeliest first (at most ``top_k``)
    likeliest: str        # the likeliest noun, however probable
    probability: float    # its probability


class EntityHead:
    """A linear layer over image embeddings whose classes are everyday nouns: :meth:`entities` names
    the likeliest nouns of each embedding."""

    def __init__(self, settings: EntitySettings, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 center: torch.Tensor | None = None) -> None:
        if weight.shape[0] != len(settings.nouns):
            raise ValueError(f"a head of {weight.shape[0]} classes for {len(settings.nouns)} nouns")
        self.settings = settings
        self.weight, self.center = weight.float().contiguous(), None if center is None else center.float()
        self.bias = torch.zeros(len(weight)) if bias is None else bias.float()
        index = {noun: i for i, noun in enumerate(settings.vocabulary)}
        self.groups = torch.tensor([index[noun] for noun in settings.nouns])
        # softmax: which classes each noun adds up (a class counts for its own noun and each general noun over it)
        self.members = torch.zeros(len(settings.nouns), len(settings.vocabulary))
        self.members[torch.arange(len(settings.nouns)), self.groups] = 1.0
        for noun, classes in settings.general.items():
            self.members[classes, index[noun]] = 1.0

    def noun_probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(images, vocabulary): each noun's probability (softmax: the sum over its classes, a general noun's
        over the classes it gathers; sigmoid: the highest of its classes)."""
        x = embeddings.float()
        if self.center is not None:
            x = F.normalize(x, dim=-1) - self.center
        if self.settings.normalize:
            x = F.normalize(x, dim=-1)
        logits = (x @ self.weight.T + self.bias) / self.settings.temperature
        if self.settings.activation == "softmax":
            return logits.softmax(dim=-1) @ self.members
        return torch.zeros(len(x), len(self.settings.vocabulary)).scatter_reduce_(
            1, self.groups.expand(len(x), -1), logits.sigmoid(), "amax", include_self=False)

    @torch.inference_mode()
    def name(self, embeddings: torch.Tensor) -> list[Named]:
        """What the head names in each embedding: the nouns at least ``threshold`` probable (at most ``top_k``,
        likeliest first) and the likeliest noun with its probability."""
        probabilities = self.noun_probabilities(embeddings)
        found = probabilities.topk(min(self.settings.top_k, probabilities.shape[1]), dim=-1)
        names = self.settings.vocabulary
        return [Named([names[i] for p, i in zip(values, indices) if p >= self.settings.threshold],
                      names[indices[0]], values[0])
                for values, indices in zip(found.values.tolist(), found.indices.tolist())]

    def entities(self, embeddings: torch.Tensor) -> list[list[str]]:
        """The nouns of each embedding whose probability is at least ``threshold``, at most ``top_k``,
        likeliest first."""
        return [named.entities for named in self.name(embeddings)]

    def save(self, directory: str | Path) -> dict:
        """Write ``entities.safetensors`` into ``directory``; returns the settings for config.json."""
        tensors = {"weight": self.weight, "bias": self.bias, **({} if self.center is None else {"center": self.center})}
        with atomic_path(Path(directory) / ENTITIES_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        return self.settings.as_config()

    @classmethod
    def load(cls, directory: str | Path, settings: dict) -> EntityHead:
        tensors = load_file(str(Path(directory) / ENTITIES_FILE))
        return cls(EntitySettings(**settings), tensors["weight"], tensors.get("bias"), tensors.get("center"))


def names_any(caption: str, entities: list[str]) -> bool:
    """Whether ``caption`` names one of ``entities`` (every word of it, as lemmas: "Two cats." names cat)."""
    said = {lemma(word) for word in words(caption)}
    return any(all(lemma(word) in said for word in words(entity)) for entity in entities)


def likeliest_naming(beams: list[str], entities: list[str]) -> str:
    """The first (likeliest) of ``beams`` that names one of ``entities``; the first beam when none does.
    (Preferring the head's likeliest noun instead - the first beam naming it, else the next noun - named
    fewer held-out animals: 50 of 146 against 52, and 2 more of 67 foods.)"""
    return next((beam for beam in beams if names_any(beam, entities)), beams[0])


def novel_images(named: list[Named], retrieved: list[list[str]], nearest: list[float],
                 settings: EntitySettings) -> list[bool]:
    """Which images are novel beside a datastore: their nearest entry (cosine ``nearest``) is less similar
    than ``settings.novel_similarity``; or it is less similar than ``settings.familiar_similarity``, their
    likeliest noun is at least ``settings.novel_confidence`` probable and none of their ``retrieved``
    captions names it, by itself or by a word of its ``settings.kinds`` (a neighbour titled "Aircraft." names
    the head's plane). Never, without a stored threshold; the second rule needs both of its settings."""
    if settings.novel_similarity is None:
        return [False] * len(named)
    confident, familiar = settings.novel_confidence, settings.familiar_similarity
    doubted = confident is not None and familiar is not None
    return [similarity < settings.novel_similarity
            or (doubted and similarity < familiar and found.probability >= confident
                and not any(names_any(caption, [found.likeliest, *settings.kinds.get(found.likeliest, [])])
                            for caption in captions))
            for found, captions, similarity in zip(named, retrieved, nearest)]


def _imagenet_table() -> dict:
    """imagenet_nouns.json: ``nouns`` (one per class), ``general`` (general noun -> class indices) and ``kinds``
    (noun -> words naming it more broadly or narrowly)."""
    return json.loads(resources.files("clipcap.modeling").joinpath("imagenet_nouns.json").read_text())


def imagenet_nouns() -> list[str]:
    """The everyday noun of each ImageNet class, in class order (scripts/imagenet_nouns.py made the table)."""
    return _imagenet_table()["nouns"]


def imagenet_general() -> dict[str, list[int]]:
    """The general nouns over ImageNet's classes (person, building, flower) -> the classes each gathers."""
    return _imagenet_table()["general"]


def imagenet_kinds() -> dict[str, list[str]]:
    """Each everyday noun -> the words that name it more broadly or more narrowly (WordNet: plane -> aircraft,
    person -> girl)."""
    return _imagenet_table()["kinds"]


def classifier_head(classifier: torch.nn.Linear, top_k: int = 3, threshold: float = 0.2) -> EntityHead:
    """The encoder's ImageNet classifier as an entity head (its probabilities summed per everyday noun)."""
    table = _imagenet_table()
    nouns = table["nouns"]
    if classifier.out_features != len(nouns):
        raise ValueError(f"an ImageNet classifier has {len(nouns)} classes, this one {classifier.out_features}")
    settings = EntitySettings("classifier", nouns, "softmax", 1.0, False, top_k, threshold, general=table["general"],
                              kinds=table["kinds"])
    return EntityHead(settings, classifier.weight.detach(), classifier.bias.detach())


@torch.inference_mode()
def zero_shot_head(encode_text, vocabulary: list[str], top_k: int = 3, threshold: float = 0.2,
                   temperature: float = 0.01) -> EntityHead:
    """Zero-shot entities over ``vocabulary``: each noun's text embedding, the mean of its unit-normalised
    embeddings under :data:`TEMPLATES` (``encode_text``: list of texts -> (n, d) tensor, an open_clip
    model's text tower), compared with the unit-normalised image embedding at ``temperature`` (ViECap: 0.01)."""
    rows = []
    for noun in vocabulary:
        texts = [template.format(noun) for template in TEMPLATES]
        rows.append(F.normalize(F.normalize(encode_text(texts).float(), dim=-1).mean(dim=0), dim=0))
    settings = EntitySettings("zero_shot", list(vocabulary), "softmax", temperature, True, top_k, threshold)
    return EntityHead(settings, torch.stack(rows))

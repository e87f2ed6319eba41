"""The entity head a captioner is trained with (``entities.source``), and each training caption's nouns."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch

from clipcap.config import Config, ConfigError, EntitiesConfig
from clipcap.modeling.encoders import OpenClipEncoder, build_encoder
from clipcap.modeling.entities import (EntityHead, EntitySettings, classifier_head, imagenet_general, imagenet_nouns,
                                       names_any, zero_shot_head)
from clipcap.modeling.labels import encoder_labels
from clipcap.naming import caption_nouns
from clipcap.training.tagger import fit_tagger, noun_vocabulary


def nouns_of_captions(captions_per_image, limit: int = 10) -> list[list[str]]:
    """The nouns of every caption, one list per caption in order (images with several captions give several)."""
    return [caption_nouns(caption, limit) for captions in captions_per_image for caption in captions]


def nouns_of_images(captions_per_image) -> list[set[str]]:
    return [{noun for caption in captions for noun in caption_nouns(caption)} for captions in captions_per_image]


def build_entity_head(cfg: Config, rows: pd.DataFrame, embeddings: torch.Tensor) -> EntityHead | None:
    """The entity head of ``cfg.entities.source`` for a captioner trained on ``rows`` (None: entities off)."""
    entities = cfg.entities
    if entities.source == "none":
        return None
    if entities.source == "tagger":
        head = fit_tagger(embeddings, nouns_of_images(rows["captions"]), min_images=entities.tagger_min_images,
                          steps=entities.tagger_steps, top_k=entities.top_k, threshold=entities.threshold,
                          seed=cfg.train.seed)
        if head is None:
            raise ConfigError(f"entities.source tagger: no noun is on {entities.tagger_min_images} training images; "
                              "lower entities.tagger_min_images or use another source")
        return head
    encoder = build_encoder(cfg.encoder.name)
    if entities.source == "classifier":
        labels = encoder_labels(encoder)
        if labels is None:
            raise ConfigError(f"entities.source classifier: the encoder {cfg.encoder.name!r} has no classifier; "
                              "use zero_shot (an open_clip encoder) or tagger")
        if labels.head.in_features != embeddings.shape[1]:
            raise ConfigError(f"entities.source classifier: the classifier of {cfg.encoder.name!r} reads "
                              f"{labels.head.in_features}-d embeddings, the stored ones have width {embeddings.shape[1]}; "
                              "re-embed with this encoder (dvc repro embed) or set entities.source")
        return classifier_head(labels.head, entities.top_k, entities.threshold)
    if not isinstance(encoder, OpenClipEncoder):
        raise ConfigError(f"entities.source zero_shot needs an open_clip encoder (encoder.name open_clip:...), "
                          f"not {cfg.encoder.name!r}; use classifier or tagger")
    return zero_shot_head(encoder.encode_text, vocabulary(cfg, rows), entities.top_k, entities.threshold,
                          entities.temperature)


def neighbour_similarities(datastore, embeddings: torch.Tensor, image_ids: list[str], quantiles: list[float],
                           duplicate_similarity: float, seed: int = 0, sample: int = 4000) -> list[float]:
    """The ``quantiles`` of the training images' similarities to their nearest other training image (the
    encoder's cosine, leave-one-out; estimated on ``sample`` of them): the entity head's novelty thresholds
    (``novel_similarity``, ``familiar_similarity``: :mod:`clipcap.modeling.entities`)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(embeddings), generator=generator)[:sample].tolist()
    found = datastore.nearest_similarity(embeddings[chosen], [image_ids[i] for i in chosen], duplicate_similarity)
    return [float(torch.quantile(found, quantile)) for quantile in quantiles]


def calibrated_confidence(head: EntityHead, embeddings: torch.Tensor, captions_per_image, precision: float,
                          min_images: int = 20) -> float | None:
    """The lowest probability at which ``head``'s likeliest noun is named by the image's own captions for at
    least ``precision`` of the training images (``embeddings``, ``captions_per_image``) it is that sure of,
    counted over at least ``min_images`` of them; None when no probability reaches it. For 0.4, an ImageNet
    head's is 0.47 on Tux Paint's stamps and 0.87 on Open Clip Art's drawings: it is overconfident on clip art."""
    named = head.name(embeddings)
    found = sorted(((found.probability, any(names_any(caption, [found.likeliest]) for caption in captions))
                    for found, captions in zip(named, captions_per_image)), key=lambda pair: -pair[0])
    right, lowest = 0, None
    for count, (probability, named_right) in enumerate(found, start=1):
        right += named_right
        if count >= min_images and right >= precision * count:
            lowest = probability
    return lowest


def inference_settings(head: EntityHead, entities: EntitiesConfig, datastore, embeddings: torch.Tensor,
                       image_ids: list[str], captions_per_image, duplicate_similarity: float,
                       seed: int = 0) -> EntitySettings:
    """``head``'s settings with ``entities``' inference settings for a captioner beside ``datastore`` (the
    training images' ``embeddings``, ids and captions): top_k, threshold and, with a datastore, ``in_prompt``
    and the novelty rule - the thresholds from the training images' nearest-neighbour similarities
    (:func:`neighbour_similarities`) and ``novel_confidence``, or with ``novel_precision`` the confidence
    at which the head is that often right on the training images (:func:`calibrated_confidence`; none: the
    rule is off). Without a datastore, or with ``novel_quantile`` 0, no image is novel. Training sets a new
    head's with it and the benchmarks a kept captioner's."""
    settings = dataclasses.replace(head.settings, top_k=entities.top_k, threshold=entities.threshold,
                                   novel_similarity=None, familiar_similarity=None)
    if datastore is None:
        return settings
    settings = dataclasses.replace(settings, in_prompt=entities.in_prompt)
    if not entities.novel_quantile:
        return settings
    novel, familiar = neighbour_similarities(datastore, embeddings, image_ids,
                                             [entities.novel_quantile, entities.familiar_quantile],
                                             duplicate_similarity, seed=seed)
    confidence = (entities.novel_confidence if entities.novel_precision is None else
                  calibrated_confidence(head, embeddings, captions_per_image, entities.novel_precision))
    return dataclasses.replace(settings, novel_similarity=novel, familiar_similarity=familiar,
                               novel_confidence=confidence)


def vocabulary(cfg: Config, rows: pd.DataFrame) -> list[str]:
    """The zero-shot vocabulary ``entities.vocabulary`` names."""
    name = cfg.entities.vocabulary
    if name == "imagenet":
        return list(dict.fromkeys([*imagenet_nouns(), *imagenet_general()]))
    if name == "captions":
        return noun_vocabulary(nouns_of_images(rows["captions"]), cfg.entities.tagger_min_images)
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"entities.vocabulary: {name!r} is not imagenet, captions or a text file (one noun a line)")
    found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not found:
        raise ConfigError(f"entities.vocabulary: {path} holds no noun")
    return list(dict.fromkeys(found))

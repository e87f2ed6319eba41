"""Typed, frozen configuration loaded from ``params.yaml``.

The dataclass defaults ARE the embedded offline default that ``params.yaml`` spells out (a test
checks that deleting any key from ``params.yaml`` changes nothing); the paper's full-scale recipe
is documented in the README and ``params.yaml`` comments.

One dataclass per section of ``params.yaml``; :func:`load_config` checks every key and
type and raises :class:`ConfigError` naming the offending key (``train.lr``), so bad
params fail at load time rather than deep inside a stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml

from clipcap.errors import ClipcapError


LOCAL_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ClipcapError, ValueError):
    """A ``params.yaml`` key is missing, unknown or has a bad value."""


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
ANNOTATED_SOURCES = ("karpathy", "nocaps")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class DatasetConfig:
    """Where the captioned images come from (the ``fetch`` stage).

    ``tuxpaint`` and ``openclipart`` read a Debian package's folder (``root``: null = where the package puts
    it). ``karpathy`` and ``nocaps`` read an annotations JSON (``annotations``, or downloaded from
    ``annotations_url``) and images under ``root`` (or downloaded archives from ``images_url``).
    """

    name: str = "tuxpaint"
    source: Literal["tuxpaint", "openclipart", "folder", "karpathy", "nocaps"] = "tuxpaint"
    root: str | None = None
    annotations: str | None = None
    annotations_url: str | None = None
    annotations_sha256: str | None = None
    images_url: str | tuple[str, ...] | None = None
    images_sha256: str | tuple[str, ...] | None = None
    batches_dir: str | None = None  # None: data/<name>
    limit: int | None = None
    hash_workers: int = 4  # threads hashing new image files (fetch)

    @property
    def batches(self) -> Path:
        """The folder of this dataset's user batches."""
        return Path(self.batches_dir) if self.batches_dir else Path("data") / self.name

    @property
    def image_urls(self) -> tuple[str, ...]:
        return _as_tuple(self.images_url)

    @property
    def image_sha256s(self) -> tuple[str | None, ...]:
        """One digest (or None) per entry of :attr:`image_urls`."""
        digests = _as_tuple(self.images_sha256)
        return digests or (None,) * len(self.image_urls)

    def __post_init__(self) -> None:
        if not DATASET_NAME.match(self.name):
            raise ConfigError(f"dataset.name: {self.name!r} is not a usable name (letters, digits, '-' and '_', "
                              "starting with a letter or digit): it names a folder and a registered model")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("dataset.limit must be >= 1 (or null for all items)")
        if self.hash_workers < 1:
            raise ConfigError("dataset.hash_workers must be >= 1")
        for key in ("annotations_url", "images_url"):
            for url in _as_tuple(getattr(self, key)):
                parsed = urlparse(url)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    raise ConfigError(f"dataset.{key}: expected an http(s) URL, got {url!r}")
        for key in ("annotations_sha256", "images_sha256"):
            for digest in _as_tuple(getattr(self, key)):
                if not _SHA256.match(digest):
                    raise ConfigError(f"dataset.{key}: expected 64 hex digits (the output of sha256sum), "
                                      f"got {digest!r}")
        if self.annotations_sha256 and not self.annotations_url:
            raise ConfigError("dataset.annotations_sha256: set without dataset.annotations_url; remove it or add the URL")
        if self.images_sha256 and len(_as_tuple(self.images_sha256)) != len(self.image_urls):
            raise ConfigError(f"dataset.images_sha256: {len(_as_tuple(self.images_sha256))} checksum(s) for "
                              f"{len(self.image_urls)} URL(s) in dataset.images_url; give one per URL, in the same "
                              "order (or null to skip the check)")
        if self.source not in ANNOTATED_SOURCES:
            for key in ("annotations", "annotations_url", "images_url"):
                if getattr(self, key):
                    raise ConfigError(f"dataset.{key}: only the karpathy and nocaps sources read it "
                                      f"(dataset.source is {self.source!r}); remove it or change dataset.source")
        if self.source == "folder" and not self.root:
            raise ConfigError("dataset.root: the 'folder' source needs the folder holding the images and "
                              "captions.jsonl/captions.csv")
        if self.source in ANNOTATED_SOURCES:
            example = "dataset_coco.json" if self.source == "karpathy" else "nocaps_val_4500_captions.json"
            if not self.annotations and not self.annotations_url:
                raise ConfigError(f"dataset.annotations: the {self.source} source needs its annotations file "
                                  f"(e.g. {example}): set dataset.annotations to a local path, or "
                                  "dataset.annotations_url to download it")
            if self.image_urls and self.root:
                raise ConfigError("dataset.root: leave it null when dataset.images_url is set (the archives are "
                                  "downloaded and extracted under $CLIPCAP_CACHE/downloads and read from there)")
            if not self.image_urls and not self.root:
                raise ConfigError(f"dataset.root: the {self.source} source needs the folder holding the images "
                                  "(for COCO the one with train2014/ and val2014/), or dataset.images_url to "
                                  "download image archives")


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 0
    test_fraction: float = 0.1
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError("split.test_fraction must be between 0 and 1")
        if not 0 <= self.val_fraction < 1 - self.test_fraction:
            raise ConfigError("split.val_fraction must be >= 0 and leave room for training data")


@dataclass(frozen=True)
class ValidateConfig:
    """The ``validate`` stage: bad rows are quarantined; the stage fails only above ``max_bad_fraction``."""

    min_caption_chars: int = 2
    max_caption_chars: int = 300
    min_image_side: int = 5
    max_image_pixels: int = 50_000_000   # width x height from the header; larger images are never decoded
    max_aspect_ratio: float = 32.0       # longer side / shorter side from the header; strips are never decoded
    max_bad_fraction: float = 0.05       # quarantined rows / input rows above which the stage fails
    num_workers: int = 2                 # threads decoding images for the checks; 0 = in the calling thread
    max_caption_repeats: int = 0         # a caption given to more distinct images is a series name; 0 = off
    boilerplate_patterns: tuple[str, ...] = ()  # regexes (case-insensitive search) marking boilerplate captions

    def __post_init__(self) -> None:
        if self.min_caption_chars < 1:
            raise ConfigError("validate.min_caption_chars must be >= 1")
        if self.max_caption_chars < self.min_caption_chars:
            raise ConfigError("validate.max_caption_chars must be >= validate.min_caption_chars")
        if self.min_image_side < 1:
            raise ConfigError("validate.min_image_side must be >= 1")
        if self.max_image_pixels < self.min_image_side ** 2:
            raise ConfigError("validate.max_image_pixels must be >= validate.min_image_side squared")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError("validate.max_aspect_ratio must be >= 1 (1: squares only)")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError("validate.max_bad_fraction must be between 0 and 1")
        if self.num_workers < 0:
            raise ConfigError("validate.num_workers must be >= 0")
        if self.max_caption_repeats < 0:
            raise ConfigError("validate.max_caption_repeats must be >= 0 (0 turns the check off)")
        for index, pattern in enumerate(self.boilerplate_patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"validate.boilerplate_patterns[{index}]: {pattern!r} is not a regular "
                                  f"expression ({err})") from err


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "efficientnet-lite0"
    batch_size: int = 32
    num_workers: int = 2


@dataclass(frozen=True)
class LMConfig:
    name: str = "smollm2-135m"
    tokenizer: str | None = None
    finetune: bool = False


@dataclass(frozen=True)
class MapperConfig:
    type: Literal["transformer", "mlp"] = "transformer"
    prefix_length: int = 10
    clip_length: int = 10
    num_layers: int = 2                 # the paper: 8; on ~700 captions 2 learn as well (k 1) or better (k 0)
    num_heads: int = 8
    mlp_ratio: float = 2.0
    center_embedding: bool = True
    normalize_embedding: bool = True
    dropout: float = 0.1                # in training: the transformer mapper's attention and MLP/residual activations,
                                        # the mlp mapper's hidden layer
    embedding_noise: float = 1.0        # in training: Gaussian noise on the (centred) image embedding, per dimension
                                        # relative to its RMS, its norm kept: each step sees a nearby image

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"mapper.dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_noise < 0:
            raise ConfigError(f"mapper.embedding_noise must be >= 0, got {self.embedding_noise}")
        if self.prefix_length < 1:
            raise ConfigError("mapper.prefix_length must be >= 1")
        if self.clip_length < 1:
            raise ConfigError("mapper.clip_length must be >= 1")


@dataclass(frozen=True)
class RetrievalConfig:
    """Retrieval augmentation (after SmallCap): the captions of the ``k`` nearest training images are
    written into the LM's input as a text prompt beside the image prefix."""

    k: int = 1                          # 0 = the paper's ClipCap (image prefix only)
    order: Literal["prompt_first", "prefix_first"] = "prompt_first"  # the prompt before / after the prefix
    max_caption_tokens: int = 24        # each retrieved caption is cut to this many tokens
    duplicate_similarity: float = 0.995  # training: an image never retrieves itself or entries this similar
    metric: Literal["learned", "cosine"] = "learned"  # search space: learned from the training captions | the encoder's
    metric_dim: int = 128               # learned: its width
    metric_steps: int = 150             # learned: full-batch optimiser steps
    metric_temperature: float = 0.1     # learned: softmax temperature of the similarities

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError("retrieval.k must be >= 0 (0 turns retrieval off)")
        if self.max_caption_tokens < 1:
            raise ConfigError("retrieval.max_caption_tokens must be >= 1")
        if not 0 < self.duplicate_similarity <= 1:
            raise ConfigError("retrieval.duplicate_similarity must be in (0, 1]")
        for key in ("metric_dim", "metric_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"retrieval.{key} must be >= 1")
        if self.metric_temperature <= 0:
            raise ConfigError("retrieval.metric_temperature must be > 0")


@dataclass(frozen=True)
class EntitiesConfig:
    """Entity-aware prompts (after ViECap): nouns naming what the image shows, written into the LM's input
    ("Objects: cat, cup.") beside the image prefix; in training the caption's own nouns, each dropped with
    probability ``drop``; at inference named by ``source`` (clipcap.modeling.entities)."""

    source: Literal["none", "classifier", "zero_shot", "tagger"] = "classifier"
    drop: float = 0.4                   # training: each of the caption's nouns is left out with this probability
    max_per_caption: int = 10           # training: at most this many of the caption's nouns
    top_k: int = 3                      # inference: at most this many entities
    threshold: float = 0.2              # inference: a noun's probability must be at least this
    vocabulary: str = "imagenet"        # zero_shot: imagenet (the classifier's everyday nouns) | captions (the
                                        # training captions' nouns) | a text file, one noun a line
    temperature: float = 0.01           # zero_shot: softmax temperature of the image-text similarities
    tagger_min_images: int = 2          # tagger / vocabulary captions: a noun of at least this many training images
    tagger_steps: int = 300             # tagger: full-batch optimiser steps
    novel_quantile: float = 0.1         # with retrieval: an image farther from its nearest training image than this
                                        # share of training images are from theirs is novel: its prompt holds its
                                        # entities without retrieved captions
    novel_share: float | None = 0.3     # with retrieval: the share of training prompts shown without retrieved
                                        # captions, as a novel image's are; null: novel_quantile
    familiar_quantile: float = 0.5      # with retrieval: an image at least as close to its nearest training image as
                                        # this share of training images keeps its retrieved captions
    novel_confidence: float | None = 0.5  # a farther one is novel too when its likeliest noun is at least this
                                        # probable and named by none of its retrieved captions, nor by a word
                                        # for its kind (WordNet: aircraft for a plane) (null: off)
    novel_precision: float | None = None  # or set novel_confidence from the training images: the lowest
                                        # probability at which the head's likeliest noun is in the image's own
                                        # caption for at least this share of them (none: off); null: as given
    in_prompt: Literal["all", "novel"] = "all"  # with retrieval: which images' prompts name their entities: all,
                                        # or the novel ones only (a familiar one's holds its retrieved captions alone)

    def __post_init__(self) -> None:
        if not 0 <= self.drop < 1:
            raise ConfigError("entities.drop must be in [0, 1)")
        if not 0 <= self.threshold <= 1:
            raise ConfigError("entities.threshold must be in [0, 1]")
        if not 0 <= self.novel_quantile < 1:
            raise ConfigError("entities.novel_quantile must be in [0, 1)")
        if self.novel_share is not None and not 0 <= self.novel_share < 1:
            raise ConfigError("entities.novel_share must be in [0, 1), or null (novel_quantile)")
        if not self.novel_quantile <= self.familiar_quantile < 1:
            raise ConfigError("entities.familiar_quantile must be in [novel_quantile, 1)")
        if self.novel_confidence is not None and not 0 < self.novel_confidence <= 1:
            raise ConfigError("entities.novel_confidence must be in (0, 1], or null (off)")
        if self.novel_precision is not None and not 0 < self.novel_precision <= 1:
            raise ConfigError("entities.novel_precision must be in (0, 1], or null (novel_confidence as given)")
        if self.in_prompt not in ("all", "novel"):
            raise ConfigError(f"entities.in_prompt must be all or novel, not {self.in_prompt!r}")
        for key in ("max_per_caption", "top_k", "tagger_min_images", "tagger_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"entities.{key} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("entities.temperature must be > 0")

    @property
    def enabled(self) -> bool:
        return self.source != "none"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 4
    batch_size: int = 16                # per process and per micro-step
    grad_accum_steps: int = 1           # optimizer step every N micro-batches
    lr: float = 3e-4
    warmup_steps: int = 40              # optimizer steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0              # max gradient norm; 0 = off
    max_caption_tokens: int = 32
    early_stopping_patience: int = 2    # stop after N epochs without a better val loss, keep the best; 0 = off
    checkpoint_every: int = 0           # also checkpoint every N optimizer steps; 0 = epoch ends only
    keep_checkpoints: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False               # torch.compile the model
    device: str = "auto"

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum_steps", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1")
        for key in ("warmup_steps", "early_stopping_patience", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")


@dataclass(frozen=True)
class RetrainConfig:
    """Retraining on more data: start from the champion's weights instead of from scratch."""

    warm_start: bool = True   # when the champion has this architecture and this train section (only the data grew)
    epochs: int = 1           # epochs of a warm-started run, over the new data and a replayed sample of the old
    lr: float = 1e-4          # its peak learning rate (after a warm-up of a tenth of its steps, <= train.warmup_steps)
    replay: float = 3.0       # old training images per new one in a warm-started run; 0 = all the old data

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("retrain.epochs must be >= 1")
        if self.replay < 0:
            raise ConfigError("retrain.replay must be >= 0 (0 = train on all the old data)")
        if self.lr <= 0:
            raise ConfigError("retrain.lr must be > 0")


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are generated (transformers ``generate`` with the KV cache)."""

    strategy: Literal["beam", "greedy", "sample"] = "beam"
    num_beams: int = 5                  # beam only
    max_new_tokens: int = 20
    length_penalty: float = 1.0         # beam only: >1 favours longer captions, <1 shorter
    early_stopping: bool = True         # beam only: stop once num_beams captions have ended (false: go on while a
                                        # running beam might still score higher, up to max_new_tokens)
    no_repeat_ngram_size: int = 3       # forbid repeating any n-gram of this size; 0 = off
    top_p: float = 0.9                  # sample only: nucleus
    temperature: float = 1.0            # sample only
    num_captions: int = 1               # captions returned per image (<= num_beams for beam)
    rerank: bool = True                 # retrieval-augmented beam search with one caption: the best beam and
                                        # the retrieved captions are scored by the model given the image, the
                                        # likeliest is the caption (no effect otherwise)
    rerank_margin: float = 0.75         # rerank: the best beam replaces the likeliest retrieved caption only when
                                        # its mean token negative log-likelihood is lower by more than this (nats)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("decoding.max_new_tokens must be >= 1")
        if self.num_beams < 1 or self.num_captions < 1:
            raise ConfigError("decoding.num_beams and decoding.num_captions must be >= 1")
        if self.strategy == "beam" and self.num_captions > self.num_beams:
            raise ConfigError(f"decoding.num_captions={self.num_captions} exceeds num_beams={self.num_beams}: "
                              "beam search returns at most one caption per beam")
        if self.strategy == "greedy" and self.num_captions > 1:
            raise ConfigError("decoding.num_captions > 1 needs strategy 'beam' or 'sample' (greedy gives one)")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ConfigError("decoding.top_p must be in (0, 1] and decoding.temperature > 0")
        if self.temperature > 100:
            raise ConfigError("decoding.temperature must be at most 100")
        if not -10 <= self.length_penalty <= 10:
            raise ConfigError("decoding.length_penalty must be between -10 and 10 (1: the mean log-probability)")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError("decoding.no_repeat_ngram_size must be >= 0 (0: off)")
        if self.rerank_margin < 0:
            raise ConfigError(f"decoding.rerank_margin={self.rerank_margin}: must be >= 0 (0: the likeliest "
                              "caption wins; larger: the retrieved caption is kept unless the best beam is that "
                              "much likelier)")


@dataclass(frozen=True)
class EvaluateConfig:
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    batch_size: int = 16
    num_samples: int = 25


@dataclass(frozen=True)
class RegisterConfig:
    tracking_uri: str | None = None     # None: $MLFLOW_TRACKING_URI when set (a team's tracking server), else
                                        # sqlite:///mlflow.db in the project; resolved when loaded
    experiment: str = "clipcap"
    metric: str = "CIDEr"
    min_delta: float = 0.0              # a challenger must beat the champion's metric by more than this
    promote: Literal["auto", "manual"] = "auto"  # manual: only `clipcap models promote` moves the champion

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            object.__setattr__(self, "tracking_uri", os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI)


@dataclass(frozen=True)
class ScheduleConfig:
    """When a dataset's retraining deployment (``flows/serve.py``) looks for new data."""

    cron: str = "0 3 * * *"             # a cron expression: minute hour day-of-month month day-of-week
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if len(self.cron.split()) != 5:
            raise ConfigError(f"schedule.cron: {self.cron!r} is not a 5-field cron expression "
                              "(minute hour day-of-month month day-of-week, e.g. '0 3 * * *')")


@dataclass(frozen=True)
class ServeConfig:
    """What a served model accepts (stored with the registered model; ``mlflow.pyfunc.load_model(uri,
    model_config={...})`` overrides it). Requests beyond a limit get a 4xx with a one-line reason."""

    max_images: int = 64                # images per request
    max_image_bytes: int = 20_000_000   # encoded bytes per image
    max_image_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_aspect_ratio: float = 32.0      # longer side / shorter side, read from the header before decoding
    max_request_pixels: int = 100_000_000  # width x height summed over a request's images, from their headers
    max_request_bytes: int = 64_000_000  # the HTTP body (clipcap serve): larger bodies get 413 before reading on
    max_num_beams: int = 8
    max_num_captions: int = 8
    max_new_tokens: int = 64
    max_seconds: float = 20.0           # decoding the images + generation per request; then captions end there
    max_concurrent: int = 2             # requests worked on at once (clipcap serve); others wait in the queue
    max_queued: int = 8                 # requests waiting for a slot; one more gets 503 at once
    image_root: str | None = None       # a folder whose files requests may name by path; None: paths are refused

    def __post_init__(self) -> None:
        for name in ("max_images", "max_image_bytes", "max_image_pixels", "max_request_pixels", "max_request_bytes",
                     "max_num_beams", "max_num_captions", "max_new_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1")
        if self.max_queued < 0:
            raise ConfigError("serve.max_queued must be >= 0")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError("serve.max_aspect_ratio must be >= 1 (1: squares only)")
        if not 0 < self.max_seconds < 3600:
            raise ConfigError("serve.max_seconds must be > 0 and under an hour")


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    entities: EntitiesConfig = field(default_factory=EntitiesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors name a bad value without echoing a huge one."""
    text = repr(value) if not isinstance(value, (str, bytes, list, dict, tuple)) or len(value) <= limit else \
        f"a {type(value).__name__} of length {len(value):,}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {shown(value)}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {shown(value)} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        inner = typing.get_args(hint)[0]
        return tuple(_check_value(f"{key}[{index}]", item, inner) for index, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {shown(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - programming error


def config_from_mapping(cls: type, data: Any, prefix: str) -> Any:
    """One config dataclass ``cls`` from a mapping, checked like ``params.yaml`` (errors name ``prefix.key``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}.{str(unknown[0])[:60]}: unknown key (known keys in {prefix}: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{prefix}.{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = config_from_mapping(hint, value, key)
        else:
            kwargs[name] = _check_value(key, value, hint)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], dataset: str | None = None) -> Config:
    """Build a :class:`Config` from a parsed ``params.yaml`` mapping, for one of its datasets
    (:func:`dataset_params`)."""
    if not isinstance(data, dict):
        raise ConfigError("params.yaml: expected a mapping of sections at the top level")
    data = dataset_params(data, dataset)
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(hints)}, datasets)")
    return Config(**{name: config_from_mapping(hints[name], data.get(name), name) for name in hints})


MAX_PARAMS_BYTES = 1 << 20    # params.yaml is ~15 kB; a file over a megabyte is not a parameter file
MAX_PARAMS_VALUES = 100_000   # values once YAML aliases are expanded (params.yaml: ~1,000, and no aliases)


class _ParamsLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a document whose aliases (``*name``) expand to more than
    ``MAX_PARAMS_VALUES`` values ("billion laughs": a few lines that expand to gigabytes wherever the
    data is walked, copied or printed) or refer back into their own anchor. Checked on the composed
    node graph, each node's expanded size counted once, before any Python object is built."""

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node


class _AliasBomb(yaml.YAMLError):
    pass


def _check_expansion(root: yaml.Node) -> None:
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return []

    sizes: dict[int, int] = {}   # id(node) -> the number of values it expands to
    path: set[int] = set()       # the nodes being counted (a depth-first walk, no recursion)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        if counted:
            path.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(child)] for child in children(node))
            if size > MAX_PARAMS_VALUES:
                raise _AliasBomb(f"its YAML aliases (*name) expand to more than {MAX_PARAMS_VALUES:,} values "
                                 "(an alias bomb?)")
            continue
        if id(node) in sizes:
            continue
        path.add(id(node))
        stack.append((node, True))
        for child in children(node):
            if id(child) in path:
                raise _AliasBomb(f"the YAML alias at line {child.start_mark.line + 1} refers back into its own "
                                 "anchor (a structure holding itself)")
            if id(child) not in sizes:
                stack.append((child, False))


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """``params.yaml`` as parsed YAML (a mapping), with a readable error when it is missing or broken.

    Bounded, so that a broken or hostile file fails at once instead of filling memory: a file over
    ``MAX_PARAMS_BYTES`` is refused unread, and so are YAML aliases expanding to more than
    ``MAX_PARAMS_VALUES`` values or to themselves (see :class:`_ParamsLoader`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found (run from the project root or pass --params)")
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_PARAMS_BYTES + 1)
            size = max(len(text), os.fstat(handle.fileno()).st_size)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the parameter file ({err.strerror or err})") from err
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes, more than the {MAX_PARAMS_BYTES:,} a parameter file may have; "
                          "it holds settings only (about 15 kB): restore it from git (git checkout params.yaml)")
    try:
        data = yaml.load(text, Loader=_ParamsLoader) or {}
    except _AliasBomb as err:
        raise ConfigError(f"{path}: {err}; write the values out instead of using anchors (&name) and "
                          "aliases (*name)") from err
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an int of over 4,300 digits
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def dataset_names(data: dict[str, Any]) -> list[str]:
    """The datasets a parsed ``params.yaml`` defines: the keys of ``datasets``, or the one of its
    ``dataset`` section when it has no ``datasets``."""
    datasets = data.get("datasets")
    if datasets is None:
        section = data.get("dataset")
        return [section.get("name", DatasetConfig.name) if isinstance(section, dict) else DatasetConfig.name]
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError("datasets: expected a mapping of dataset names to their overrides, e.g. "
                          "'datasets: {tuxpaint: {}}'")
    for name in datasets:
        if not isinstance(name, str) or not DATASET_NAME.match(name):
            raise ConfigError(f"datasets.{name}: not a usable dataset name (letters, digits, '-' and '_', "
                              "starting with a letter or digit)")
    return list(datasets)


def dataset_params(data: dict[str, Any], dataset: str | None = None) -> dict[str, Any]:
    """The sections of one dataset: the shared sections of ``params.yaml`` with that dataset's
    overrides from ``datasets.<name>`` merged in, key by key (``dataset: None`` = the first listed)."""
    names = dataset_names(data)
    name = names[0] if dataset is None else dataset
    if name not in names:
        raise ConfigError(f"dataset {name!r}: not defined in params.yaml (datasets: {', '.join(names)})")
    base = {section: values for section, values in data.items() if section != "datasets"}
    if "datasets" not in data:
        return base
    overrides = data["datasets"][name] or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"datasets.{name}: expected a mapping of sections to override (or {{}}), got {overrides!r}")
    merged = dict(base)
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise ConfigError(f"datasets.{name}.{section}: expected a mapping of keys, got {values!r}")
        merged[section] = {**(base.get(section) or {}), **values}
    given = (overrides.get("dataset") or {}).get("name", name)
    if given != name:
        raise ConfigError(f"datasets.{name}.dataset.name: {given!r}; a dataset's name is its key in datasets")
    merged["dataset"] = {**(merged.get("dataset") or {}), "name": name}
    return merged


def load_config(path: str | Path = "params.yaml", dataset: str | None = None) -> Config:
    """Load and check ``params.yaml`` for one of its datasets (``None``: the first listed)."""
    data = read_params(path)
    try:
        return config_from_dict(data, dataset)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

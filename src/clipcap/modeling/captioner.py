"""A trained captioner on disk (``config.json`` + ``model.safetensors``, and the caption datastore
of a retrieval-augmented one) and the inference API.

The frozen LM and the image encoder are not copied into every captioner: they are
resolved by name (``lm.name``, ``encoder``) when loading, so many dataset-specific
captioners share one base LM. LM weights are saved when the LM was fine-tuned or is not
reproducible from its name (tiny random test LMs).

Nothing is trusted on load: ``config.json`` records the sha256 of every file saved beside it, of
the base LM's weights and the encoder's key (which names its weights' digest). A damaged or
altered file, or a base LM or encoder that resolves to other weights on this machine, is an
error naming what differs and what to do, never a captioner that silently says something else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clipcap.config import DecodingConfig, MapperConfig, RetrievalConfig
from clipcap.modeling.decode import caption_nll, generate_captions
from clipcap.modeling.encoders import ImageEncoder, build_encoder, encode_images, encoder_key
from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path, file_sha256, read_json, write_json
from clipcap.modeling.lms import load_lm, weights_digest
from clipcap.modeling.model import ClipCap
from clipcap.modeling.entities import ENTITIES_FILE, EntityHead, EntitySettings, Named, likeliest_naming, novel_images
from clipcap.modeling.retrieval import CAPTIONS_FILE, EMBEDDINGS_FILE, CaptionDatastore, Retriever, prompt_token_ids

FORMAT = "clipcap-captioner/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
BASE_LM_DIR = "base_lm"  # a registered captioner's copy of the files its base LM is rebuilt from (lms.base_lm_files)


def save_captioner(directory: str | Path, model: ClipCap, *, encoder: str, lm_name: str,
                   tokenizer_name: str | None, lm_pretrained: bool, retrieval: RetrievalConfig | None = None,
                   datastore: CaptionDatastore | None = None, entities: EntityHead | None = None,
                   extra: dict | None = None) -> Path:
    """Write a captioner folder; ``retrieval`` None (or ``k: 0``) and ``entities`` None is the paper's model,
    without datastore or entity head."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    retrieval = retrieval or RetrievalConfig(k=0)
    if retrieval.k and datastore is None:
        raise ValueError("a retrieval-augmented captioner needs its datastore")
    if datastore is not None:
        datastore.save(directory)
    save_lm = model.finetune_lm or not lm_pretrained
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(model.weights(include_lm=save_lm), str(tmp))
    entity_settings = None if entities is None else entities.save(directory)
    saved = [WEIGHTS_FILE, *([EMBEDDINGS_FILE, CAPTIONS_FILE] if datastore is not None else []),
             *([ENTITIES_FILE] if entities is not None else [])]
    write_json(directory / CONFIG_FILE, {
        "format": FORMAT,
        "encoder": encoder,
        "encoder_key": encoder_key(encoder),
        "lm": {"name": lm_name, "tokenizer": tokenizer_name, "finetuned": model.finetune_lm,
               "weights_saved": save_lm, **({} if save_lm else {"base_sha256": weights_digest(model.lm)})},
        "files": {name: file_sha256(directory / name) for name in saved},
        "mapper": asdict(model.mapper_cfg),
        "dim_embedding": model.dim_embedding,
        "retrieval": asdict(retrieval),
        **({} if entity_settings is None else {"entities": entity_settings}),
        **(extra or {}),
    })
    return directory


def read_config(directory: str | Path) -> dict:
    """A captioner folder's ``config.json``, its files checked against the digests it records."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: not a clipcap captioner (no {CONFIG_FILE}); train one with 'clipcap train'")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ClipcapError(f"{config_path}: unsupported format {config.get('format')!r} (expected {FORMAT})")
    verify_files(directory, config)
    return config


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The saved weights of a captioner folder (what :meth:`ClipCap.load_weights` takes)."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise ClipcapError(f"{path}: unreadable ({type(err).__name__}: {err}); "
                           "restore it (dvc checkout, or the registered version) or retrain") from err


def load_captioner_model(directory: str | Path) -> tuple[ClipCap, object, dict]:
    """(model, tokenizer, config) from a captioner folder."""
    directory = Path(directory)
    config = read_config(directory)
    bundled = directory / BASE_LM_DIR
    lm = load_lm(config["lm"]["name"], config["lm"]["tokenizer"], bundled=bundled if bundled.is_dir() else None)
    recorded = config["lm"].get("base_sha256")
    if recorded and weights_digest(lm.model) != recorded:
        raise ClipcapError(
            f"{directory}: the base LM {config['lm']['name']!r} resolves here to other weights than the ones this "
            "captioner was trained with (their sha256 differs from config.json's lm.base_sha256); install the "
            "LM it names (see its requirements.txt) or retrain on this machine")
    retrieval = RetrievalConfig(**config.get("retrieval", {}))
    model = ClipCap(MapperConfig(**config["mapper"]), config["dim_embedding"], lm.model,
                    finetune_lm=config["lm"]["finetuned"], prompt_order=retrieval.order)
    weights = read_weights(directory)
    try:
        model.load_weights(weights)
    except ValueError as err:
        raise ClipcapError(f"{directory / WEIGHTS_FILE}: {err}; it does not belong to {CONFIG_FILE}") from err
    return model.eval(), lm.tokenizer, config


def verify_files(directory: Path, config: dict) -> None:
    """Each file ``config.json`` lists has the sha256 recorded when the captioner was saved
    (``clipcap datastore add`` records the datastore it rewrites)."""
    for name, digest in config.get("files", {}).items():
        path = directory / name
        if not path.exists():
            raise ClipcapError(f"{path}: missing; a captioner folder holds {', '.join(config['files'])}")
        if file_sha256(path) != digest:
            raise ClipcapError(f"{path}: does not match the sha256 recorded in {CONFIG_FILE} (damaged or altered "
                               "after saving); restore it (dvc checkout, or download the registered version again) "
                               "or retrain")


def record_files(directory: str | Path, *names: str) -> None:
    """Record the current sha256 of files a tool rewrote in a captioner folder (its datastore)."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE)
    config.setdefault("files", {}).update({name: file_sha256(directory / name) for name in names})
    write_json(directory / CONFIG_FILE, config)


def load_retriever(directory: str | Path, config: dict) -> Retriever | None:
    """The datastore and retrieval settings of a retrieval-augmented captioner (None: the paper's model)."""
    retrieval = RetrievalConfig(**config.get("retrieval", {}))
    if not retrieval.k:
        return None
    return Retriever(CaptionDatastore.load(directory), retrieval.k, retrieval.max_caption_tokens)


def novel_prompts(datastore: CaptionDatastore, embeddings: torch.Tensor, retrieved: list[list[str]],
                  named: list[Named], settings: EntitySettings) -> tuple[list[list[str]], list[list[str]]]:
    """Each image's retrieved captions and entities for its prompt: a novel image
    (:func:`clipcap.modeling.entities.novel_images`) gets no retrieved captions and at least its likeliest noun;
    a familiar one its retrieved captions, and its entities unless ``settings.in_prompt`` is "novel"."""
    novel = ([False] * len(named) if settings.novel_similarity is None
             else novel_images(named, retrieved, datastore.nearest_similarity(embeddings).tolist(), settings))

    def entities(found: Named, new: bool) -> list[str]:
        if new:
            return found.entities or [found.likeliest]
        return found.entities if settings.in_prompt == "all" else []

    return ([[] if new else found for found, new in zip(retrieved, novel)],
            [entities(found, new) for found, new in zip(named, novel)])


def load_entities(directory: str | Path, config: dict) -> EntityHead | None:
    """The entity head of an entity-aware captioner (None: it takes no entities)."""
    settings = config.get("entities")
    return None if settings is None else EntityHead.load(directory, settings)


class Captioner:
    """Images in, captions out: ``Captioner.load(path).caption(["cat.png"])``."""

    def __init__(self, model: ClipCap, tokenizer, config: dict, retriever: Retriever | None = None,
                 encoder: ImageEncoder | None = None, entities: EntityHead | None = None) -> None:
        self.model, self.tokenizer, self.config, self.retriever = model, tokenizer, config, retriever
        self.entity_head = entities
        self._encoder = encoder

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> Captioner:
        model, tokenizer, config = load_captioner_model(directory)
        return cls(model.to(device), tokenizer, config, load_retriever(directory, config),
                   entities=load_entities(directory, config))

    @property
    def encoder(self) -> ImageEncoder:
        """The image encoder the captioner was trained with (built on first use, and checked: an
        encoder name that resolves to other weights here would embed images in another space)."""
        if self._encoder is None:
            encoder = build_encoder(self.config["encoder"])
            recorded = self.config.get("encoder_key")
            if recorded and encoder.key != recorded:
                raise ClipcapError(f"encoder {self.config['encoder']!r} resolves here to {encoder.key}, but this "
                                   f"captioner was trained with {recorded}; install those weights or retrain")
            self._encoder = encoder.to(next(self.model.parameters()).device)
        return self._encoder

    def embed(self, images: list[str | Path | Image.Image], batch_size: int = 32, num_workers: int = 0) -> torch.Tensor:
        return torch.cat(list(encode_images(self.encoder, images, batch_size, num_workers)))

    def caption_embeddings(self, embeddings: torch.Tensor, decoding: DecodingConfig = DecodingConfig(),
                           batch_size: int = 16, max_time: float | None = None) -> list[list[str]]:
        """``decoding.num_captions`` captions for each image embedding (with its prompt: retrieved captions,
        entities); ``max_time``: seconds of generation per batch, after which captions end where they are."""
        retrieved = None if self.retriever is None else self.retriever.captions(embeddings)
        named = None if self.entity_head is None else self.entity_head.name(embeddings.cpu())
        entities = None if named is None else [found.entities for found in named]
        if retrieved is not None and named is not None:   # a novel image: its entities alone
            retrieved, entities = novel_prompts(self.retriever.datastore, embeddings, retrieved, named,
                                                self.entity_head.settings)
        prompts = self.prompts_of(retrieved, entities)
        if not (decoding.rerank and (retrieved is not None or entities is not None) and decoding.strategy == "beam"
                and decoding.num_captions == 1):
            return generate_captions(self.model, self.tokenizer, embeddings, decoding, batch_size, prompts, max_time)
        # rerank. Beam search ranks its beams by the model's likelihood given the image (mean token
        # log-probability, EOS included, at length_penalty 1). An image with retrieved captions: the best beam
        # and every retrieved caption are scored by the model (the best beam again, as its text may have been
        # cut at a line break: first_line), and the likeliest retrieved caption is kept unless the beam is
        # likelier by more than decoding.rerank_margin: the LM's rewrites of a right neighbour cost more than
        # its fixes of a wrong one gain (README, "rerank_margin"). An image prompted with entities alone: the
        # likeliest beam that names one of them (a lighter constrained beam search), else the best beam
        beams = generate_captions(self.model, self.tokenizer, embeddings,
                                  dataclasses.replace(decoding, rerank=False, num_captions=decoding.num_beams),
                                  batch_size, prompts, max_time)
        near = retrieved if retrieved is not None else [[] for _ in beams]
        named = entities if entities is not None else [[] for _ in beams]
        best = [[likeliest_naming(found, nouns) if nouns and not close else found[0]]
                for found, nouns, close in zip(beams, named, near)]
        candidates = [list(dict.fromkeys(c for c in [*r, *b] if c)) if r else [] for b, r in zip(best, near)]
        owner = [i for i, found in enumerate(candidates) for _ in found]
        if not owner:
            return best
        nll = caption_nll(self.model, self.tokenizer, embeddings, [c for found in candidates for c in found],
                          owner=owner, prompts=prompts, batch_size=batch_size).tolist()
        start = 0
        for index, (found, (beam,), close) in enumerate(zip(candidates, best, near)):
            if not found:
                continue
            scores = dict(zip(found, nll[start : start + len(found)]))
            start += len(found)
            kept = min((c for c in close if c), key=scores.get, default=beam)
            rewrite = beam and beam != kept and scores[beam] < scores[kept] - decoding.rerank_margin
            best[index] = [beam if rewrite else kept]
        return best

    def entities(self, embeddings: torch.Tensor) -> list[list[str]] | None:
        """The entities the captioner's head names in each image (None: it takes no entities)."""
        return None if self.entity_head is None else self.entity_head.entities(embeddings.cpu())

    def prompts_of(self, retrieved: list[list[str]] | None, entities: list[list[str]] | None
                   ) -> list[list[int]] | None:
        """Each image's prompt: its retrieved captions and its entities (None for the paper's model)."""
        if retrieved is None and entities is None:
            return None
        max_tokens = self.retriever.max_caption_tokens if self.retriever is not None else 0
        return prompt_token_ids(self.tokenizer, retrieved, max_tokens, entities)

    def prompts(self, embeddings: torch.Tensor, retrieved: list[list[str]] | None) -> list[list[int]] | None:
        """Each image's prompt: ``retrieved`` and the entities the head names in it."""
        return self.prompts_of(retrieved, self.entities(embeddings))

    def iter_captions(self, images: list[str | Path | Image.Image], decoding: DecodingConfig = DecodingConfig(),
                      batch_size: int = 16, num_workers: int = 0, progress: bool = False,
                      max_time: float | None = None) -> Iterator[list[str]]:
        """``decoding.num_captions`` captions per image, image by image, encoding and decoding in
        batches of ``batch_size`` (images are decoded in ``num_workers`` processes)."""
        for embeddings in encode_images(self.encoder, images, batch_size, num_workers, progress=progress):
            yield from self.caption_embeddings(embeddings, decoding, batch_size, max_time)

    def captions(self, images: list[str | Path | Image.Image], decoding: DecodingConfig = DecodingConfig(),
                 batch_size: int = 16, max_time: float | None = None) -> list[list[str]]:
        return list(self.iter_captions(images, decoding, batch_size, max_time=max_time))

    def caption(self, images: list[str | Path | Image.Image], decoding: DecodingConfig = DecodingConfig(),
                batch_size: int = 16) -> list[str]:
        """The best caption of each image."""
        return [found[0] for found in self.iter_captions(images, decoding, batch_size)]

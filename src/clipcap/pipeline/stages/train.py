"""``clipcap train [--resume]``: train the captioner on the train split (validation loss on val).

It starts from the champion's weights when only the data grew (``retrain``, :mod:`warm_start`),
else from scratch; ``training/summary.json`` says which. Under ``torchrun`` every process runs this
and rank 0 writes. ``resume`` continues from ``artifacts/<dataset>/checkpoints`` when the checkpoint
was made from the same params, data and starting point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math

import pandas as pd
import torch

from clipcap.config import Config, RetrievalConfig, config_to_dict
from clipcap.errors import ClipcapError
from clipcap.fileio import write_json
from clipcap.modeling.captioner import save_captioner
from clipcap.modeling.decode import GREEDY, generate_captions
from clipcap.modeling.encoders import encoder_key
from clipcap.modeling.lms import load_lm
from clipcap.modeling.model import ClipCap
from clipcap.modeling.retrieval import CaptionDatastore, KeyProjection, Retriever, cut_captions, per_caption, prompt_token_ids
from clipcap.modeling.captioner import novel_prompts
from clipcap.pipeline.entity_heads import build_entity_head, inference_settings, nouns_of_captions
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.metrics import cider
from clipcap.pipeline.reports import write_learning_curve, write_loss_log
from clipcap.pipeline.splits import split_data
from clipcap.pipeline.tracking import training_run
from clipcap.pipeline.warm_start import find_warm_start, recipe, replay_rows
from clipcap.training.batches import CaptionPairs, EntityPrompts, tokenize_captions
from clipcap.training.distributed import current_context
from clipcap.training.loop import train_model
from clipcap.training.retrieval_metric import fit_key_projection

log = logging.getLogger(__name__)


def run(cfg: Config, layout: Layout | None = None, resume: bool = False, tracking: bool = True) -> None:
    """Train; with ``tracking``, in an MLflow run opened now (:mod:`clipcap.pipeline.tracking`) that the
    register stage completes."""
    layout = layout or Layout.of(cfg.dataset.name)
    (train_rows, train_emb), (val_rows, val_emb) = split_data(layout, cfg.encoder.name, "train", "val")
    if len(train_rows) == 0:
        raise ClipcapError("the train split is empty: add data or lower split.test_fraction/val_fraction")
    lm = load_lm(cfg.lm.name, cfg.lm.tokenizer, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = ClipCap(cfg.mapper, train_emb.shape[1], lm.model, finetune_lm=cfg.lm.finetune,
                    prompt_order=cfg.retrieval.order)
    model.fit_embedding_mean(train_emb)
    start = find_warm_start(cfg)
    train_cfg, fit_rows, images = cfg.train, train_rows, None
    if start.weights is not None:
        model.load_weights(start.weights)
        fit_rows = replay_rows(train_rows, start.trained_on, cfg.retrain.replay, cfg.train.seed)
        train_cfg = dataclasses.replace(cfg.train, epochs=cfg.retrain.epochs, lr=cfg.retrain.lr,
                                        warmup_steps=warm_start_warmup(cfg, sum(map(len, fit_rows["captions"]))))
        if start.trained_on is not None:
            new = int((~train_rows["image_id"].isin(start.trained_on)).sum())
            images = {"new": new, "old": len(fit_rows) - new}
    log.info("training %s: %s%s", "warm-started" if start.source else "from scratch", start.reason,
             f"; on {images['new']} new training images and {images['old']} of the old" if images else "")
    retriever = training_retriever(cfg.retrieval, train_rows, train_emb, seed=cfg.train.seed,
                                   projection=start.projection)
    entity_head = build_entity_head(cfg, train_rows, train_emb)
    share = cfg.entities.novel_quantile if cfg.entities.novel_share is None else cfg.entities.novel_share
    novel = share if entity_head is not None and retriever is not None else 0.0
    if entity_head is not None:
        entity_head.settings = inference_settings(entity_head, cfg.entities, retriever.datastore if retriever else None,
                                                  train_emb, train_rows["image_id"].tolist(), train_rows["captions"],
                                                  cfg.retrieval.duplicate_similarity, seed=cfg.train.seed)
    if entity_head is not None and entity_head.settings.novel_similarity is not None:
        settings = entity_head.settings
        log.info("entities: an image less similar than %.3f to its nearest training image is novel (%s of the "
                 "training images are)%s", settings.novel_similarity, cfg.entities.novel_quantile,
                 "" if settings.novel_confidence is None else
                 f", and one less similar than {settings.familiar_similarity:.3f} whose likeliest noun is at least "
                 f"{settings.novel_confidence:.2f} probable and named by none of its retrieved captions")
    if novel:
        log.info("entities: %s of the training prompts go without retrieved captions, as a novel image's do", novel)
    max_tokens = cfg.train.max_caption_tokens

    def pairs(rows: pd.DataFrame, embeddings: torch.Tensor, training: bool = True) -> CaptionPairs:
        """Training pairs; with entities, each caption's own nouns (dropped at random per epoch) in its
        prompt when ``training``, else (validation) the entities the head names, as at inference."""
        retrieved = None if retriever is None else retriever.captions(  # leave-one-out: never the image itself
            embeddings, rows["image_id"].tolist(), cfg.retrieval.duplicate_similarity)
        if entity_head is None:
            prompts = None if retriever is None else retriever.prompts_of(lm.tokenizer, retrieved)
        elif training:
            cut = None if retrieved is None else [cut_captions(lm.tokenizer, found, cfg.retrieval.max_caption_tokens)
                                                  for found in retrieved]
            prompts = EntityPrompts(lm.tokenizer, nouns_of_captions(rows["captions"], cfg.entities.max_per_caption),
                                    cfg.entities.drop, cfg.train.seed, cut, novel)
        else:
            named = entity_head.name(embeddings)
            entities = [found.entities for found in named]
            if retriever is not None:
                retrieved, entities = novel_prompts(retriever.datastore, embeddings, retrieved, named, entity_head.settings)
            prompts = prompt_token_ids(lm.tokenizer, retrieved, cfg.retrieval.max_caption_tokens, entities)
        return caption_pairs(rows, embeddings, lm.tokenizer, max_tokens, prompts)

    val_pairs = pairs(val_rows, val_emb, training=False) if len(val_rows) else None

    def val_cider(trained: ClipCap) -> dict:
        """The learning curve's second axis: greedy captions of the val images, scored by CIDEr."""
        found = generate_captions(trained, lm.tokenizer, val_emb, GREEDY, 32, val_pairs.prompts)
        return {"val_CIDEr": cider(dict(zip(val_rows["image_id"], val_rows["captions"])),
                                   {i: c[0] for i, c in zip(val_rows["image_id"], found)})}

    main = current_context().is_main
    tags = {"clipcap.warm_start": start.source or f"scratch: {start.reason}", "clipcap.resumed": str(resume).lower()}
    with training_run(cfg, tags) if tracking and main else contextlib.nullcontext() as live:
        history = train_model(model, pairs(fit_rows, train_emb[fit_rows.index.to_numpy()]), val_pairs, train_cfg,
                              pad_token_id=lm.tokenizer.pad_token_id, checkpoint_dir=layout.checkpoints, resume=resume,
                              fingerprint=training_fingerprint(cfg, fit_rows, val_rows, start=start.source),
                              on_epoch=val_cider if val_pairs is not None else None,
                              on_step=live.on_step if live else None, on_epoch_end=live.on_epoch_end if live else None)
    if not main:
        return
    save_captioner(layout.model, model.cpu(), encoder=cfg.encoder.name, lm_name=cfg.lm.name,
                   tokenizer_name=cfg.lm.tokenizer, lm_pretrained=lm.pretrained, retrieval=cfg.retrieval,
                   datastore=retriever.datastore if retriever else None, entities=entity_head,
                   extra={"recipe": recipe(cfg)})
    write_loss_log(layout.train_log, history.steps)
    write_learning_curve(layout.learning_curve, history.epochs)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    write_json(layout.train_summary, {"trainable_parameters": trainable, "parameters": model.parameter_summary(),
                                      "train_pairs": sum(len(c) for c in train_rows["captions"]), "epochs": history.epochs,
                                      "stopped_early": history.stopped_early, "final_loss": history.steps[-1]["loss"],
                                      "warm_start": start.describe(train_cfg.epochs, images),
                                      "mlflow_run": live.describe() if live else None})
    log.info("model saved to %s", layout.model)


def warm_start_warmup(cfg: Config, pairs: int) -> int:
    """A warm-started run's warm-up: a tenth of its optimizer steps (the weights are trained, the
    optimizer's moments are not), at most ``train.warmup_steps``."""
    steps = cfg.retrain.epochs * math.ceil(math.ceil(pairs / cfg.train.batch_size) / cfg.train.grad_accum_steps)
    return min(cfg.train.warmup_steps, max(1, steps // 10))


def training_fingerprint(cfg: Config, *splits: pd.DataFrame, start: str | None = None) -> str:
    """What a checkpoint must have been trained on to be resumed: params, data and starting weights."""
    train_cfg = {k: v for k, v in config_to_dict(cfg.train).items()
                 if k not in ("device", "checkpoint_every", "keep_checkpoints")}
    described = {"lm": config_to_dict(cfg.lm), "mapper": config_to_dict(cfg.mapper), "train": train_cfg,
                 "retrieval": config_to_dict(cfg.retrieval), "entities": config_to_dict(cfg.entities),
                 "encoder": encoder_key(cfg.encoder.name), "images": [rows["image_id"].tolist() for rows in splits],
                 **({"start": start, "retrain": config_to_dict(cfg.retrain)} if start else {})}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def training_retriever(cfg: RetrievalConfig, rows: pd.DataFrame, embeddings: torch.Tensor,
                       seed: int = 0, projection: KeyProjection | None = None) -> Retriever | None:
    """The datastore of the training split (one entry per caption), searched in a space learned from
    its captions (``retrieval.metric: learned``; ``projection``: one learned before, a warm start's) or
    the encoder's; None for the paper's model."""
    if not cfg.k:
        return None
    if cfg.metric == "cosine":
        projection = None
    elif projection is None:
        projection = fit_key_projection(embeddings, rows["captions"].tolist(), dim=cfg.metric_dim,
                                        temperature=cfg.metric_temperature, steps=cfg.metric_steps, seed=seed)
    datastore = CaptionDatastore.of_images(embeddings, rows["captions"], rows["image_id"], projection=projection)
    log.info("retrieval: %d captions of %d training images in the datastore (%s space); %d per prompt (%s)",
             len(datastore), len(rows), cfg.metric, cfg.k, cfg.order)
    return Retriever(datastore, cfg.k, cfg.max_caption_tokens)


def caption_pairs(rows: pd.DataFrame, embeddings: torch.Tensor, tokenizer, max_tokens: int,
                  prompts: list[list[int]] | EntityPrompts | None = None) -> CaptionPairs:
    """One pair per caption (several per image), captions tokenised and EOS-terminated."""
    image_index, captions = per_caption(rows["captions"])
    return CaptionPairs(embeddings, image_index, tokenize_captions(tokenizer, captions, max_tokens), prompts)

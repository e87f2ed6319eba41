"""Runs the quality and leave-category-out benchmarks keep (``--keep``), captioned again with the current
inference code and params.yaml's inference settings (``--rescore``): no training.

A kept run is a project folder (``clipcap.pipeline.layout.Layout``: manifest, embeddings, ``model/``) with
the seconds its training took in ``run.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from clipcap.pipeline.layout import Layout
from clipcap.pipeline.stages import evaluate

TIMING_FILE = "run.json"   # a kept run's training seconds


def kept_run(folder: Path, name: str) -> Path:
    """``folder/name``: a run kept by ``--keep`` (exits, naming it, when there is none)."""
    kept = folder / name
    if not (kept / "model").is_dir():
        raise SystemExit(f"{kept}: no kept run there (train it with --keep)")
    return kept


def save_timing(workdir: Path, seconds: float) -> dict:
    timing = {"train_seconds": seconds}
    (workdir / TIMING_FILE).write_text(json.dumps(timing))
    return timing


def refresh_entities(cfg, model: Path) -> None:
    """Set a kept captioner's entity head to ``cfg.entities``' inference settings, as training sets a new
    one's (``inference_settings``: the novelty thresholds from its datastore) and, for the encoder's
    classifier, to the current ImageNet noun table and general nouns (the head's weights are the
    classifier's, unchanged). Rewrites its config.json."""
    from clipcap.modeling.entities import EntitySettings, imagenet_general, imagenet_nouns
    from clipcap.modeling.retrieval import CaptionDatastore
    from clipcap.pipeline.entity_heads import inference_settings

    config = json.loads((model / "config.json").read_text())
    if "entities" not in config:
        return
    settings = EntitySettings(**config["entities"])
    if settings.source == "classifier":
        settings = dataclasses.replace(settings, nouns=imagenet_nouns(), general=imagenet_general())
    store = CaptionDatastore.load(model) if config.get("retrieval", {}).get("k") else None
    first = {} if store is None else {image: row for row, image in reversed(list(enumerate(store.image_ids)))}
    settings = inference_settings(settings, cfg.entities, store, None if store is None else store.embeddings[list(first.values())],
                                  list(first), cfg.retrieval.duplicate_similarity, seed=cfg.train.seed)
    config["entities"] = settings.as_config()
    (model / "config.json").write_text(json.dumps(config, indent=2))


def rescore_one(cfg, workdir: Path, threads: int | None = None) -> dict:
    """Caption a kept run's test images again with the current inference code and settings
    (:func:`refresh_entities`); no training."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    layout = Layout(workdir)
    refresh_entities(cfg, layout.model)
    timing = workdir / TIMING_FILE
    return evaluate.run(cfg, layout) | (json.loads(timing.read_text()) if timing.exists() else {})

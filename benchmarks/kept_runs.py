"""Runs the quality and leave-category-out benchmarks keep (``--keep``), captioned again with the current
inference code and params.yaml's inference settings (``--rescore``): no training.

A kept run is a project folder (``clipcap.pipeline.layout.Layout``: manifest, embeddings, ``model/``) with
the seconds its training took in ``run.json``. ``--split val`` captions its validation images instead of
its test images (:func:`split_view`): inference settings are chosen there, the test split left unseen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd

from clipcap.pipeline.layout import Layout
from clipcap.pipeline.stages import evaluate

TIMING_FILE = "run.json"   # a kept run's training seconds


def add_arguments(parser: argparse.ArgumentParser, split_help: str) -> None:
    """``--keep``, ``--rescore`` and ``--split``, as the quality and leave-category-out benchmarks take them."""
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's trained project in this folder")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="caption the runs kept in this folder (--keep) again with the current code and "
                             "params.yaml's inference settings, no training")
    parser.add_argument("--split", choices=("test", "val"), default="test", help=f"with --rescore: {split_help}")


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments; an error, naming the fix, for ``--split val`` without kept runs to caption."""
    args = parser.parse_args()
    if args.split != "test" and not args.rescore:
        parser.error("--split val needs --rescore (kept runs)")
    return args


def report_entry(args: argparse.Namespace) -> dict:
    """What a report records of a rescore: the folder of kept runs and the split captioned (empty otherwise)."""
    return {"rescored": str(args.rescore), "split": args.split} if args.rescore else {}


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


def refresh_entities(cfg, model: Path, artifacts: Path) -> None:
    """Set a kept captioner's entity head to ``cfg.entities``' inference settings, as training sets a new
    one's (``inference_settings``: the novelty thresholds from the training images of ``artifacts``, its
    project folder) and, for the encoder's classifier, to the current ImageNet noun table, general nouns and kinds
    (the head's weights are the classifier's, unchanged). Rewrites its config.json."""
    from clipcap.modeling.entities import EntityHead, EntitySettings, imagenet_general, imagenet_kinds, imagenet_nouns
    from clipcap.modeling.retrieval import CaptionDatastore
    from clipcap.pipeline.entity_heads import inference_settings
    from clipcap.pipeline.splits import split_data

    config = json.loads((model / "config.json").read_text())
    if "entities" not in config:
        return
    settings = EntitySettings(**config["entities"])
    if settings.source == "classifier":
        settings = dataclasses.replace(settings, nouns=imagenet_nouns(), general=imagenet_general(),
                                       kinds=imagenet_kinds())
    store = CaptionDatastore.load(model) if config.get("retrieval", {}).get("k") else None
    (rows, embeddings), = split_data(Layout(artifacts), config["encoder"], "train")
    settings = inference_settings(EntityHead.load(model, settings.as_config()), cfg.entities, store, embeddings,
                                  rows["image_id"].tolist(), rows["captions"], cfg.retrieval.duplicate_similarity,
                                  seed=cfg.train.seed)
    config["entities"] = settings.as_config()
    (model / "config.json").write_text(json.dumps(config, indent=2))


def view_folder(workdir: Path, split: str) -> Path:
    """Where :func:`split_view` puts a kept run's view of ``split``."""
    return workdir if split == "test" else workdir / f"as-{split}"


def split_view(workdir: Path, split: str) -> Path:
    """A kept run whose ``split`` rows are its test split: ``workdir`` itself for ``test``, else a folder
    inside it (made anew) with that manifest and links to the run's model, training record and embeddings."""
    if split == "test":
        return workdir
    run, view = Layout(workdir), Layout(view_folder(workdir, split))
    manifest = pd.read_parquet(run.manifest)
    if not (manifest["split"] == split).any():
        raise SystemExit(f"{workdir}: its manifest has no {split!r} rows (splits: {sorted(set(manifest['split']))})")
    shutil.rmtree(view.root, ignore_errors=True)
    view.root.mkdir()
    manifest["split"] = manifest["split"].map(lambda found: "test" if found == split else
                                              "unseen" if found == "test" else found)
    manifest.to_parquet(view.manifest)
    for linked in ("embeddings", "model", "training_dir"):
        getattr(view, linked).symlink_to(getattr(run, linked).resolve(), target_is_directory=True)
    return view.root


def rescore_one(cfg, workdir: Path, threads: int | None = None, split: str = "test") -> dict:
    """Caption a kept run's ``split`` images (test, or val: :func:`split_view`) again with the current inference
    code and settings (:func:`refresh_entities`); no training."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    refresh_entities(cfg, Layout(workdir).model, workdir)
    timing = workdir / TIMING_FILE
    return evaluate.run(cfg, Layout(split_view(workdir, split))) | (
        json.loads(timing.read_text()) if timing.exists() else {})

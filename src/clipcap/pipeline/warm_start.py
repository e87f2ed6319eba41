"""Warm starts: a retrain begins from the champion's weights when only the data grew.

The champion qualifies when it was trained with this project's recipe: the same encoder, LM, mapper,
retrieval settings and ``train`` section (seed included; the knobs that only say where and how fast
it runs are left out). Each captioner records its recipe in ``config.json``. A warm-started run trains
``retrain.epochs`` at ``retrain.lr`` over all the training data, old and new; any other change to the
recipe means a run from scratch, since the champion's weights would then answer another question.

What the champion was trained on is its datastore's images: a warm-started run trains on the new
images and ``retrain.replay`` times as many old ones (:func:`replay_rows`, rehearsal against
forgetting), searching the champion's retrieval space, so its cost follows the new data.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from clipcap.config import Config
from clipcap.errors import ClipcapError
from clipcap.modeling.captioner import read_config, read_weights
from clipcap.modeling.retrieval import CAPTIONS_FILE, EMBEDDINGS_FILE, KeyProjection
from clipcap.pipeline.registry import champion_uri, download_captioner

log = logging.getLogger(__name__)

RUNTIME_ONLY = ("device", "checkpoint_every", "keep_checkpoints", "compile", "precision")


@dataclass(frozen=True)
class WarmStart:
    source: str | None                          # models:/clipcap-<dataset>/<version>, or None: from scratch
    reason: str
    weights: dict[str, torch.Tensor] | None = None
    trained_on: frozenset[str] | None = None    # the champion's training images (its datastore's), when known
    projection: KeyProjection | None = None     # the champion's learned retrieval space

    def describe(self, epochs: int, images: dict[str, int] | None = None) -> dict:
        return {"from": self.source, "reason": self.reason, "epochs": epochs, **({"images": images} if images else {})}


def recipe(cfg: Config) -> dict:
    """What a champion must have been trained with to be warm-started from (as JSON stores it)."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in RUNTIME_ONLY}
    return json.loads(json.dumps({"encoder": cfg.encoder.name, "lm": asdict(cfg.lm), "mapper": asdict(cfg.mapper),
                                  "retrieval": asdict(cfg.retrieval), "entities": asdict(cfg.entities),
                                  "train": train}))


def find_warm_start(cfg: Config) -> WarmStart:
    """The champion's weights when ``retrain.warm_start`` is on and the champion has this recipe."""
    if not cfg.retrain.warm_start:
        return WarmStart(None, "retrain.warm_start is off")
    uri = champion_uri(cfg.register, cfg.dataset.name)
    if uri is None:
        return WarmStart(None, "no champion yet")
    try:
        directory = download_captioner(uri, cfg.register.tracking_uri)
        theirs = read_config(directory).get("recipe")
        if theirs is None:
            return WarmStart(None, f"{uri} records no training recipe")
        ours, recorded = _flat(recipe(cfg)), _flat(theirs)
        differs = sorted(key for key in ours.keys() | recorded.keys() if ours.get(key) != recorded.get(key))
        if differs:
            return WarmStart(None, f"{uri} was trained with other {', '.join(differs[:4])}"
                                   f"{' ...' if len(differs) > 4 else ''}")
        return WarmStart(uri, f"the champion {uri}: same recipe, more data", read_weights(directory),
                         *champion_datastore(directory))
    except (ClipcapError, OSError, ValueError) as err:
        return WarmStart(None, f"{uri} could not be read ({err})")


def champion_datastore(directory: Path) -> tuple[frozenset[str] | None, KeyProjection | None]:
    """The image ids in a captioner's datastore (its training images) and its retrieval space; (None,
    None) for the paper's model, which has none. Reads the two projection tensors alone, not the embeddings."""
    if not (directory / CAPTIONS_FILE).exists():
        return None, None
    trained_on = frozenset(json.loads((directory / CAPTIONS_FILE).read_text())["image_ids"])
    with safe_open(str(directory / EMBEDDINGS_FILE), framework="pt") as found:
        tensors = {key: found.get_tensor(key) for key in found.keys() if key.startswith("projection.")}
    return trained_on, KeyProjection.from_tensors(tensors)


def replay_rows(rows: pd.DataFrame, trained_on: frozenset[str] | None, replay: float, seed: int) -> pd.DataFrame:
    """The training rows of a warm-started run: every image the champion was not trained on, and ``replay``
    times as many that it was (a sample seeded by ``seed``), in manifest order. All rows when ``replay``
    is 0, when the champion's images are unknown, or when no training image is new."""
    if not replay or trained_on is None:
        return rows
    old = rows["image_id"].isin(trained_on)
    if old.all():
        return rows
    count = min(int(old.sum()), math.ceil(replay * int((~old).sum())))
    sample = rows[old].sample(n=count, random_state=seed)
    return rows[~old | rows.index.isin(sample.index)]


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

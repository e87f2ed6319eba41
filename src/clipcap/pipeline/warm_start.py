"""Warm starts: a retrain begins from the champion's weights when only the data grew.

The champion qualifies when it was trained with this project's recipe: the same encoder, LM, mapper,
retrieval settings and ``train`` section (seed included; the knobs that only say where and how fast
it runs are left out). Each captioner records its recipe in ``config.json``. A warm-started run trains
``retrain.epochs`` at ``retrain.lr`` over all the training data, old and new; any other change to the
recipe means a run from scratch, since the champion's weights would then answer another question.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch

from clipcap.config import Config
from clipcap.errors import ClipcapError
from clipcap.modeling.captioner import read_config, read_weights
from clipcap.pipeline.registry import champion_uri, download_captioner

log = logging.getLogger(__name__)

RUNTIME_ONLY = ("device", "checkpoint_every", "keep_checkpoints", "compile", "precision")


@dataclass(frozen=True)
class WarmStart:
    source: str | None                          # models:/clipcap-<dataset>/<version>, or None: from scratch
    reason: str
    weights: dict[str, torch.Tensor] | None = None

    def describe(self, epochs: int) -> dict:
        return {"from": self.source, "reason": self.reason, "epochs": epochs}


def recipe(cfg: Config) -> dict:
    """What a champion must have been trained with to be warm-started from (as JSON stores it)."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in RUNTIME_ONLY}
    return json.loads(json.dumps({"encoder": cfg.encoder.name, "lm": asdict(cfg.lm), "mapper": asdict(cfg.mapper),
                                  "retrieval": asdict(cfg.retrieval), "train": train}))


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
        return WarmStart(uri, f"the champion {uri}: same recipe, more data", read_weights(directory))
    except (ClipcapError, OSError) as err:
        return WarmStart(None, f"{uri} could not be read ({err})")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

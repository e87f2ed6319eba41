"""The test split's captions as evaluation scores them: shared by the evaluate stage (the new model)
and the register stage (a champion re-scored on the current test split before the gate)."""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm import tqdm

from clipcap.config import EvaluateConfig
from clipcap.modeling.captioner import Captioner

log = logging.getLogger(__name__)


def caption_test_split(captioner: Captioner, embeddings: torch.Tensor, cfg: EvaluateConfig) -> list[str]:
    """The one caption per test image that is scored (evaluate.decoding, num_captions 1)."""
    decoding = dataclasses.replace(cfg.decoding, num_captions=1)
    log.info("captioning %d test images (%s%s)", len(embeddings), decoding,
             f"; {captioner.retriever.k} retrieved captions each" if captioner.retriever else "")
    captions: list[str] = []
    with tqdm(total=len(embeddings), desc="caption", unit="img", disable=len(embeddings) <= cfg.batch_size) as bar:
        for start in range(0, len(embeddings), cfg.batch_size):
            batch = embeddings[start : start + cfg.batch_size]
            captions += [c[0] for c in captioner.caption_embeddings(batch, decoding, cfg.batch_size)]
            bar.update(len(batch))
    return captions

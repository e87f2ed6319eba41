"""The rows of each split of the clean manifest, with their stored embeddings."""

from __future__ import annotations

import pandas as pd
import torch

from clipcap.data.manifest import read_manifest
from clipcap.modeling.encoders import encoder_key
from clipcap.pipeline.embedding_store import EmbeddingStore
from clipcap.pipeline.layout import Layout


def split_data(layout: Layout, encoder: str, *splits: str) -> list[tuple[pd.DataFrame, torch.Tensor]]:
    """For each split: its rows of the clean manifest (written by ``validate``) and their embeddings."""
    frame = read_manifest(layout.manifest)
    store = EmbeddingStore(layout.embeddings, encoder_key(encoder))
    out = []
    for split in splits:
        rows = frame[frame["split"] == split].reset_index(drop=True)
        out.append((rows, store.get(rows["image_id"].tolist())))
    return out

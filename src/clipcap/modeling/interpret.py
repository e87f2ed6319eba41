"""Prefix interpretability, as in the paper: each of the K prefix vectors read as the vocabulary
tokens whose input embeddings are nearest to it by cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipcap.modeling.model import ClipCap


@dataclass(frozen=True)
class NearestToken:
    token: str
    token_id: int
    cosine: float


@torch.inference_mode()
def nearest_tokens(model: ClipCap, tokenizer, embedding: torch.Tensor, top_k: int = 5) -> list[list[NearestToken]]:
    """For one image embedding (shape ``(e,)``): per prefix position, the ``top_k`` nearest tokens."""
    model.eval()
    vocabulary = model.lm.get_input_embeddings().weight
    prefix = model.prefix(embedding.reshape(1, -1).to(vocabulary.device))[0].to(vocabulary.dtype)
    similarity = F.normalize(prefix, dim=-1) @ F.normalize(vocabulary, dim=-1).T  # (K, V)
    scores, ids = similarity.topk(top_k, dim=-1)
    return [[NearestToken(tokenizer.convert_ids_to_tokens(int(i)), int(i), float(s)) for s, i in zip(row_s, row_i)]
            for row_s, row_i in zip(scores.tolist(), ids.tolist())]

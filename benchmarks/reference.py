"""The baseline: ClipCap written with the habits of the 2021 reference code (rmokady/CLIP_prefix_caption).

Deliberately *not* built on clipcap's library, except the mapper classes (same architecture and
sizes, so the comparison measures the training and decoding code, not the mapper):

- fp32; every caption padded with token 0 to a static 40 tokens; ``ignore_index=0``;
- the LM returns full-vocabulary logits at every position, the prefix positions included;
- a "frozen" LM keeps ``requires_grad=True`` (all its weight gradients are computed) and is
  only left out of the optimizer;
- decoding one image at a time and without a KV cache: every step re-runs GPT-2 on the whole
  sequence (prefix + tokens so far) through ``inputs_embeds``.

Decoding always runs ``steps`` tokens (the reference stopped at "."), so the work is fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel

from clipcap.modeling.model import MLPMapper, TransformerMapper

PAD_LENGTH = 40  # the reference padded to mean + 10 std tokens, ~40 for COCO


def mapper(kind: str, dim_embedding: int, dim_lm: int, prefix_length: int, clip_length: int) -> nn.Module:
    """The paper's mappers: transformer 8 layers x 8 heads, MLP ratio 2; or the 2-layer MLP."""
    if kind == "mlp":
        return MLPMapper(dim_embedding, dim_lm, prefix_length)
    return TransformerMapper(dim_embedding, dim_lm, prefix_length, clip_length,
                             num_layers=8, num_heads=8, mlp_ratio=2.0)


class ReferenceClipCap(nn.Module):
    """``ClipCaptionModel`` / ``ClipCaptionPrefix`` of the reference code."""

    def __init__(self, mapper: nn.Module, gpt: GPT2LMHeadModel, prefix_length: int, frozen_lm: bool) -> None:
        super().__init__()
        self.clip_project, self.gpt = mapper, gpt
        self.prefix_length, self.frozen_lm = prefix_length, frozen_lm

    def project(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.clip_project(prefix).view(-1, self.prefix_length, self.gpt.config.n_embd)

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary at every position, prefix included."""
        embedding_cat = torch.cat([self.project(prefix), self.gpt.transformer.wte(tokens)], dim=1)
        return self.gpt(inputs_embeds=embedding_cat, labels=None, attention_mask=mask).logits

    def train(self, mode: bool = True) -> ReferenceClipCap:
        super().train(mode)
        if self.frozen_lm:
            self.gpt.eval()
        return self

    def optimized_parameters(self) -> list[nn.Parameter]:
        """What the reference handed to AdamW: the mapper only when the LM is "frozen"
        (``ClipCaptionPrefix.parameters()`` was overridden; ``requires_grad`` stayed True)."""
        return list(self.clip_project.parameters() if self.frozen_lm else self.parameters())


def pad_tokens(token_ids: list[list[int]], prefix_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask): tokens padded with 0 to ``PAD_LENGTH``; the mask covers prefix + caption."""
    tokens = torch.zeros(len(token_ids), PAD_LENGTH, dtype=torch.long)
    mask = torch.zeros(len(token_ids), prefix_length + PAD_LENGTH)
    for row, ids in enumerate(token_ids):
        ids = ids[:PAD_LENGTH]
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, : prefix_length + len(ids)] = 1
    return tokens, mask


def train_step(model: ReferenceClipCap, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               prefix: torch.Tensor, mask: torch.Tensor) -> float:
    """One step of the reference loop (no clipping, no mixed precision). ``zero_grad`` clears only the
    optimizer's parameters: a "frozen" LM's gradients keep accumulating, as in the reference."""
    logits = model(tokens, prefix, mask)[:, model.prefix_length - 1 : -1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _next_logits(model: ReferenceClipCap, generated: torch.Tensor) -> torch.Tensor:
    return model.gpt(inputs_embeds=generated).logits[:, -1]  # the whole sequence, every step


@torch.no_grad()
def greedy(model: ReferenceClipCap, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    """``generate2`` for one image (``prefix``: shape (1, e)) -> token ids, shape (steps,)."""
    generated, tokens = model.project(prefix), []
    for _ in range(steps):
        next_token = _next_logits(model, generated).argmax(-1, keepdim=True)
        tokens.append(next_token)
        generated = torch.cat([generated, model.gpt.transformer.wte(next_token)], dim=1)
    return torch.cat(tokens, dim=1)[0]


@torch.no_grad()
def beam(model: ReferenceClipCap, prefix: torch.Tensor, steps: int, beam_size: int = 5) -> torch.Tensor:
    """``generate_beam`` for one image -> the best beam's token ids, shape (steps,).

    No beam ever stops here, so the reference's ``is_stopped`` bookkeeping is left out."""
    generated = model.project(prefix)
    tokens = scores = None
    seq_lengths = torch.ones(beam_size, device=prefix.device)
    for _ in range(steps):
        logits = _next_logits(model, generated).softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            scores_sum = scores[:, None] + logits
            seq_lengths += 1
            scores_average, flat = (scores_sum / seq_lengths[:, None]).view(-1).topk(beam_size, -1)
            source, next_tokens = flat // scores_sum.shape[1], (flat % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat([tokens[source], next_tokens], dim=1)
            generated = generated[source]
            scores = scores_average * seq_lengths
        next_embed = model.gpt.transformer.wte(next_tokens.squeeze(1)).view(beam_size, 1, -1)
        generated = torch.cat([generated, next_embed], dim=1)
    return tokens[(scores / seq_lengths).argmax()]

"""The ClipCap model: image embedding -> mapping network -> prefix of K LM embeddings -> LM.

Two mappers after the paper:

- ``transformer``: Linear(e -> clip_length*d), concatenated with K learned constants, a
  pre-norm transformer (``num_layers`` x ``num_heads``, MLP ratio ``mlp_ratio``); only the
  K constant positions are output. Used with a frozen LM.
- ``mlp``: Linear(e -> d*K/2) -> Tanh -> Linear(-> d*K). Used with LM fine-tuning.

``d`` is always read from the LM's input embeddings, never hard-coded.

Retrieval-augmented (``retrieval.k > 0``, see :mod:`clipcap.modeling.retrieval`), the LM's input
also holds a text prompt with the captions of similar images, before the image prefix
(``prompt_order="prompt_first"``, the default) or after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from clipcap.config import ConfigError, MapperConfig

IGNORE_INDEX = -100
PROMPT_ORDERS = ("prompt_first", "prefix_first")


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded sequence: 0 at its first real token (as ``generate()`` counts)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


class MLPMapper(nn.Module):
    def __init__(self, dim_embedding: int, dim_lm: int, prefix_length: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.prefix_length, self.dim_lm = prefix_length, dim_lm
        hidden = dim_lm * prefix_length // 2
        self.net = nn.Sequential(
            nn.Linear(dim_embedding, hidden), nn.Tanh(), nn.Linear(hidden, dim_lm * prefix_length)
        )
        self.dropout = nn.Dropout(dropout)   # on the hidden layer (outside net: its weights keep their names)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.net[1](self.net[0](embedding)))
        return self.net[2](hidden).view(-1, self.prefix_length, self.dim_lm)


class TransformerMapper(nn.Module):
    """The paper's transformer mapper, plus a final LayerNorm whose gain starts at the LM's
    token-embedding scale (``output_scale``): the prefix then enters the LM at the scale of real
    tokens instead of ~7x larger, which on small data decides between learning and collapse."""

    def __init__(self, dim_embedding: int, dim_lm: int, prefix_length: int, clip_length: int,
                 num_layers: int, num_heads: int, mlp_ratio: float, output_scale: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim_lm % num_heads:
            raise ConfigError(f"mapper.num_heads={num_heads} must divide the LM width {dim_lm}")
        self.prefix_length, self.clip_length, self.dim_lm = prefix_length, clip_length, dim_lm
        self.linear = nn.Linear(dim_embedding, clip_length * dim_lm)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_lm))
        layer = nn.TransformerEncoderLayer(
            d_model=dim_lm, nhead=num_heads, dim_feedforward=int(dim_lm * mlp_ratio), dropout=dropout,
            activation="relu", batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim_lm)
        nn.init.constant_(self.norm.weight, output_scale)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.linear(embedding).view(-1, self.clip_length, self.dim_lm)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.norm(self.transformer(torch.cat([x, const], dim=1))[:, self.clip_length :])


def build_mapper(cfg: MapperConfig, dim_embedding: int, dim_lm: int, output_scale: float = 1.0) -> nn.Module:
    if cfg.type == "mlp":
        return MLPMapper(dim_embedding, dim_lm, cfg.prefix_length, cfg.dropout)
    return TransformerMapper(dim_embedding, dim_lm, cfg.prefix_length, cfg.clip_length,
                             cfg.num_layers, cfg.num_heads, cfg.mlp_ratio, output_scale, cfg.dropout)


class ClipCap(nn.Module):
    """Mapper + causal LM. ``finetune_lm=False`` freezes the LM with ``requires_grad_(False)``."""

    def __init__(self, mapper_cfg: MapperConfig, dim_embedding: int, lm: PreTrainedModel,
                 finetune_lm: bool = False, prompt_order: str = "prompt_first") -> None:
        super().__init__()
        if prompt_order not in PROMPT_ORDERS:
            raise ConfigError(f"retrieval.order: {prompt_order!r} is not one of {', '.join(PROMPT_ORDERS)}")
        self.mapper_cfg, self.dim_embedding, self.finetune_lm = mapper_cfg, dim_embedding, finetune_lm
        self.prompt_order = prompt_order
        self.lm = lm
        token_embeddings = lm.get_input_embeddings().weight
        self.mapper = build_mapper(mapper_cfg, dim_embedding, token_embeddings.shape[1],
                                   output_scale=float(token_embeddings.detach().float().std()))
        self.lm.requires_grad_(finetune_lm)
        # mean training embedding, set by fit_embedding_mean() and saved with the weights
        self.register_buffer("embedding_mean", torch.zeros(dim_embedding))

    def train(self, mode: bool = True) -> ClipCap:
        super().train(mode)
        if not self.finetune_lm:
            self.lm.eval()  # a frozen LM keeps dropout off
        return self

    @torch.no_grad()
    def fit_embedding_mean(self, embeddings: torch.Tensor) -> None:
        """Remember the mean training embedding (used when ``center_embedding`` is on).

        Pooled CNN features are all positive and share a large common direction; without
        centering, every image maps to nearly the same prefix and the captions collapse.
        """
        self.embedding_mean.copy_(embeddings.float().mean(dim=0))

    def prefix(self, embedding: torch.Tensor) -> torch.Tensor:
        """The K prefix vectors in the LM's input-embedding space, shape (B, K, d)."""
        if self.mapper_cfg.center_embedding:
            embedding = embedding - self.embedding_mean
        if self.mapper_cfg.normalize_embedding:
            # unit RMS per dimension (L2 norm sqrt(e)): a unit-norm 1280-d vector would feed the
            # first layer inputs of ~0.03, so its image-dependent weights would barely learn
            embedding = F.normalize(embedding, dim=-1) * embedding.shape[-1] ** 0.5
        if self.training and self.mapper_cfg.embedding_noise:
            embedding = self.perturb(embedding, self.mapper_cfg.embedding_noise)
        return self.mapper(embedding)

    @staticmethod
    def perturb(embedding: torch.Tensor, noise: float) -> torch.Tensor:
        """``embedding`` plus Gaussian noise of ``noise`` times its RMS per dimension, rescaled to its norm:
        a direction at angle ~atan(noise) from it (noise 0.5: cosine 0.89). A regulariser for small data (after
        CapDec's noise injection): the mapper learns a neighbourhood of each image, not its exact point."""
        norm = embedding.norm(dim=-1, keepdim=True)
        jitter = torch.randn_like(embedding) * (noise * norm / embedding.shape[-1] ** 0.5)
        return F.normalize(embedding + jitter, dim=-1) * norm

    def context(self, embedding: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the caption continues, as LM input embeddings and mask, left-padded as one block:
        the image prefix, with the retrieval prompt (left-padded ids) before or after it."""
        prefix = self.prefix(embedding)
        prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if prompt_ids is None:
            return prefix, prefix_mask
        prompt = self.lm.get_input_embeddings()(prompt_ids)
        prefix = prefix.to(prompt.dtype)
        first = self.prompt_order == "prompt_first"
        inputs = torch.cat([prompt, prefix] if first else [prefix, prompt], dim=1)
        mask = torch.cat([prompt_mask, prefix_mask] if first else [prefix_mask, prompt_mask], dim=1)
        if not first:  # move the prompt's padding to the far left, keeping the order of the rest
            order = mask.argsort(dim=1, stable=True)
            inputs, mask = inputs.gather(1, order[..., None].expand_as(inputs)), mask.gather(1, order)
        return inputs, mask

    def forward(self, embedding: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                per_caption: bool = False) -> torch.Tensor:
        """Mean cross-entropy of the caption tokens (``per_caption``: one mean per caption, shape (B,)):
        labels are -100 on padding (the prefix and the prompt predict nothing), and the LM head - the
        largest matrix - is applied only to the hidden states that predict caption tokens."""
        tokens = self.lm.get_input_embeddings()(input_ids)
        if prompt_ids is not None and not self.finetune_lm and self.prompt_order == "prompt_first":
            return self._forward_after_cached_prompt(embedding, tokens, input_ids, attention_mask, prompt_ids,
                                                     prompt_mask, per_caption)
        context, context_mask = self.context(embedding, prompt_ids, prompt_mask)
        inputs = torch.cat([context.to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([context_mask, attention_mask], dim=1)
        options = {} if prompt_ids is None else {"position_ids": positions(mask)}
        hidden = self.lm.base_model(inputs_embeds=inputs, attention_mask=mask, **options).last_hidden_state
        return self._caption_loss(hidden[:, context.shape[1] - 1 : -1], input_ids, attention_mask, per_caption)

    def _forward_after_cached_prompt(self, embedding, tokens, input_ids, attention_mask, prompt_ids, prompt_mask,
                                     per_caption: bool = False):
        """The same loss, with the prompt run once without gradients into the KV cache: with a frozen
        LM and the prompt first, nothing trainable comes before it, so it needs no backward pass."""
        with torch.no_grad():
            past = self.run_lm(self.lm.get_input_embeddings()(prompt_ids), prompt_mask).cache
        prefix = self.prefix(embedding).to(tokens.dtype)
        inputs = torch.cat([prefix, tokens], dim=1)
        mask = torch.cat([prompt_mask, attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        hidden = self.run_lm(inputs, mask, past).last_hidden_state
        return self._caption_loss(hidden[:, prefix.shape[1] - 1 : -1], input_ids, attention_mask, per_caption)

    @torch.inference_mode()
    def caption_nll(self, embedding: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    owner: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                    prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each caption's mean token negative log-likelihood, shape (C,): row j of ``input_ids`` is a
        caption of image ``owner[j]`` (an index into ``embedding``). The context (prompt and prefix)
        runs once per image into the KV cache, which is then copied to each of its captions: scoring
        six candidates of an image costs one context, not six."""
        context, context_mask = self.context(embedding, prompt_ids, prompt_mask)
        context = context.to(self.lm.dtype)
        ran = self.run_lm(context, context_mask)
        ran.cache.reorder_cache(owner)
        mask = torch.cat([context_mask[owner], attention_mask], dim=1)
        tokens = self.lm.get_input_embeddings()(input_ids).to(context.dtype)
        hidden = self.run_lm(tokens, mask, ran.cache).last_hidden_state
        predicting = torch.cat([ran.last_hidden_state[owner, -1:], hidden[:, :-1]], dim=1)
        return self._caption_loss(predicting, input_ids, attention_mask, per_caption=True)

    def run_lm(self, inputs: torch.Tensor, mask: torch.Tensor, cache=None):
        """The LM's blocks (no head) on left-padded input embeddings, continuing ``cache`` when given:
        ``mask`` covers the cached positions and ``inputs``, and positions count from the first real
        token. The output holds the hidden states and the KV cache to continue from."""
        start = mask.shape[1] - inputs.shape[1]
        return self.lm.base_model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions(mask)[:, start:],
                                  cache=cache, use_cache=True)

    def _caption_loss(self, predicting: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      per_caption: bool = False):
        """``predicting[:, i]`` is the hidden state that predicts caption token i. The LM head (the
        largest matrix) runs on the real caption tokens only, never the prefix, the prompt or padding.
        Under ``torch.compile`` it runs on every caption position, padding included, so that no shape
        depends on the data (selecting the real tokens breaks the graph at ``nonzero``; compiled
        batches are padded to a multiple of 8, so little is wasted)."""
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if not per_caption and not torch.compiler.is_compiling():
            real = attention_mask.bool()
            logits = self.lm.get_output_embeddings()(predicting[real]).float()
            return F.cross_entropy(logits, input_ids[real])
        logits = self.lm.get_output_embeddings()(predicting).float()
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none" if per_caption else "mean")
        if not per_caption:
            return losses
        return losses.view(labels.shape).sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def weights(self, include_lm: bool | None = None) -> dict[str, torch.Tensor]:
        """The state to save, on the CPU: mapper and buffers, plus the LM's weights when ``include_lm``
        (default: when the LM is fine-tuned, i.e. when they differ from the base LM). A tensor shared
        by several keys (tied input/output embeddings) is kept once, under its first key:
        safetensors refuses shared storage, and :meth:`load_weights` restores the alias."""
        include_lm = self.finetune_lm if include_lm is None else include_lm
        seen, out = set(), {}
        for key, value in self.state_dict().items():
            pointer = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if (include_lm or not key.startswith("lm.")) and pointer not in seen:
                seen.add(pointer)
                out[key] = value.detach().cpu().contiguous()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`weights` returned: without the LM's weights for a frozen LM, and
        possibly without the aliases of tied LM weights (which share a loaded tensor)."""
        missing, unexpected = self.load_state_dict(weights, strict=False)
        state = self.state_dict()
        loaded = {state[k].data_ptr() for k in weights if k in state}
        lm_saved = any(k.startswith("lm.") for k in weights)
        lost = [k for k in missing if not (k.startswith("lm.") and (not lm_saved or state[k].data_ptr() in loaded))]
        if unexpected or lost:
            raise ValueError(f"weights do not match the model (missing {lost[:3]}, unexpected {unexpected[:3]})")

    def parameter_summary(self) -> str:
        """E.g. ``41,765,376 trainable of 166,205,952 (transformer mapper; LM frozen)``."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return (f"{trainable:,} trainable of {total:,} ({self.mapper_cfg.type} mapper; "
                f"LM {'fine-tuned' if self.finetune_lm else 'frozen'})")

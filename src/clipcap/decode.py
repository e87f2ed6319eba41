"""Caption generation through transformers ``generate(inputs_embeds=...)`` (beam search or
greedy, batched, with the KV cache), stopping at the LM's EOS token."""

from __future__ import annotations

import torch

from clipcap.model import ClipCap


@torch.inference_mode()
def generate_token_ids(model: ClipCap, embeddings: torch.Tensor, *, eos_token_id: int, pad_token_id: int,
                       num_beams: int = 5, max_new_tokens: int = 20) -> torch.Tensor:
    """New token ids per image, shape (B, <= max_new_tokens); finished rows are padded."""
    model.eval()
    device = next(model.parameters()).device
    prefix = model.prefix(embeddings.to(device))
    return model.lm.generate(
        inputs_embeds=prefix,
        attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=device),
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def generate_captions(model: ClipCap, tokenizer, embeddings: torch.Tensor, num_beams: int = 5,
                      max_new_tokens: int = 20, batch_size: int = 32) -> list[str]:
    captions: list[str] = []
    for start in range(0, embeddings.shape[0], batch_size):
        ids = generate_token_ids(model, embeddings[start : start + batch_size], eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, num_beams=num_beams,
                                 max_new_tokens=max_new_tokens)
        captions.extend(text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True))
    return captions

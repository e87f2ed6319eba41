"""Caption generation through transformers ``generate(inputs_embeds=...)``: batched greedy, beam
search or nucleus sampling with the KV cache, stopping at the LM's EOS token."""

from __future__ import annotations

import warnings

import torch

from clipcap.config import DecodingConfig
from clipcap.modeling.model import ClipCap
from clipcap.modeling.retrieval import ENTITY_HEAD, PROMPT_HEAD, PROMPT_TAIL, pad_left, pad_right

GREEDY = DecodingConfig(strategy="greedy")


def generate_kwargs(decoding: DecodingConfig) -> dict:
    """The ``generate()`` arguments for one decoding configuration."""
    kwargs = {"max_new_tokens": decoding.max_new_tokens, "num_return_sequences": decoding.num_captions,
              "no_repeat_ngram_size": decoding.no_repeat_ngram_size or None}
    if decoding.strategy == "beam":
        return {**kwargs, "num_beams": decoding.num_beams, "do_sample": False,
                "length_penalty": decoding.length_penalty, "early_stopping": decoding.early_stopping}
    if decoding.strategy == "sample":
        return {**kwargs, "num_beams": 1, "do_sample": True, "top_p": decoding.top_p,
                "temperature": decoding.temperature, "top_k": 0}
    return {**kwargs, "num_beams": 1, "do_sample": False}


def rows_per_input(decoding: DecodingConfig) -> int:
    """How many rows ``generate()`` makes of each input: one per beam, or per sampled caption."""
    return decoding.num_beams if decoding.strategy == "beam" else decoding.num_captions


def shared_context_cache(model: ClipCap, context: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of all but the last context position (prompt and prefix), run once per image and
    copied to its ``copies`` rows; ``generate()`` then runs only the last position. Left to itself it
    would copy the inputs first and run the whole context once per beam. None when there is one row."""
    if copies == 1 or context.shape[1] < 2:
        return None
    cache = model.run_lm(context[:, :-1], mask[:, :-1]).cache
    cache.batch_repeat_interleave(copies)
    return cache


@torch.inference_mode()
def generate_token_ids(model: ClipCap, embeddings: torch.Tensor, *, eos_token_id: int, pad_token_id: int,
                       decoding: DecodingConfig = GREEDY, prompt_ids: torch.Tensor | None = None,
                       prompt_mask: torch.Tensor | None = None, max_time: float | None = None) -> torch.Tensor:
    """New token ids, shape (B * num_captions, <= max_new_tokens): the captions of image i are rows
    i*num_captions ... (i+1)*num_captions-1, best first for beam search; finished rows are padded.
    ``prompt_ids``/``prompt_mask``: the left-padded retrieval prompts of a retrieval-augmented model.
    ``max_time``: seconds after which generation stops where it is (a served model's time budget)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.mapper.parameters()).dtype  # a bf16 model takes fp32 embeddings too
    if prompt_ids is not None:
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    context, mask = model.context(embeddings.to(device, dtype), prompt_ids, prompt_mask)
    context = context.to(model.lm.dtype)
    cache = shared_context_cache(model, context, mask, rows_per_input(decoding))
    with warnings.catch_warnings():  # the context holds no token ids, so n-gram blocking covers the caption only
        warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*inputs_embeds")
        return model.lm.generate(
            inputs_embeds=context,
            attention_mask=mask,
            **({"cache": cache} if cache is not None else {}),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            max_time=max_time,
            **generate_kwargs(decoding),
        )


def first_line(text: str) -> str:
    """A caption is one line, and never the prompt's own words: what an LM writes after a line break,
    or from a repeated "This image shows:", "Similar images show:" or "Objects:" on, is not part of it
    ("Pen. Objects: clock." is "Pen.")."""
    line = text.strip().split("\n", 1)[0]
    for marker in (PROMPT_TAIL, PROMPT_HEAD, ENTITY_HEAD):
        line = line.split(marker, 1)[0]
    return line.strip()


def generate_captions(model: ClipCap, tokenizer, embeddings: torch.Tensor, decoding: DecodingConfig = GREEDY,
                      batch_size: int = 32, prompts: list[list[int]] | None = None,
                      max_time: float | None = None) -> list[list[str]]:
    """``decoding.num_captions`` captions for each embedding, in batches of ``batch_size`` images;
    ``prompts``: each image's retrieval prompt (token ids) for a retrieval-augmented model."""
    captions: list[list[str]] = []
    for start in range(0, embeddings.shape[0], batch_size):
        prompt = {}
        if prompts is not None:
            ids, mask = pad_left(prompts[start : start + batch_size], tokenizer.pad_token_id)
            prompt = {"prompt_ids": ids, "prompt_mask": mask}
        ids = generate_token_ids(model, embeddings[start : start + batch_size], eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, decoding=decoding, max_time=max_time, **prompt)
        texts = [first_line(text) for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        n = decoding.num_captions
        captions.extend(texts[i : i + n] for i in range(0, len(texts), n))
    return captions


@torch.inference_mode()
def caption_nll(model: ClipCap, tokenizer, embeddings: torch.Tensor, captions: list[str], *,
                owner: list[int] | None = None, prompts: list[list[int]] | None = None,
                batch_size: int = 16) -> torch.Tensor:
    """Each caption's mean token negative log-likelihood (EOS included) under the model, given its
    image: caption j belongs to image ``owner[j]`` (row of ``embeddings``, with retrieval prompt
    ``prompts[owner[j]]``); without ``owner``, caption j to image j. Images go ``batch_size`` at a
    time, each with all its captions, its context run once (:meth:`ClipCap.caption_nll`)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.mapper.parameters()).dtype
    owner_of = torch.arange(len(captions)) if owner is None else torch.as_tensor(owner, dtype=torch.long)
    if owner_of.shape != (len(captions),) or bool(((owner_of < 0) | (owner_of >= embeddings.shape[0])).any()):
        raise ValueError(f"owner must give each of the {len(captions)} captions the index of one of the "
                         f"{embeddings.shape[0]} images")
    token_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(captions), add_special_tokens=False)["input_ids"]]
    nll = torch.empty(len(captions))
    for start in range(0, embeddings.shape[0], batch_size):
        rows = ((owner_of >= start) & (owner_of < start + batch_size)).nonzero().flatten()
        if len(rows) == 0:
            continue
        ids, mask = pad_right([token_ids[j] for j in rows.tolist()], tokenizer.pad_token_id)
        prompt = {}
        if prompts is not None:
            prompt_ids, prompt_mask = pad_left(prompts[start : start + batch_size], tokenizer.pad_token_id)
            prompt = {"prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device)}
        nll[rows] = model.caption_nll(embeddings[start : start + batch_size].to(device, dtype), ids.to(device),
                                      mask.to(device), (owner_of[rows] - start).to(device), **prompt).float().cpu()
    return nll

"""Caption tokenisation and batching for training.

Every caption ends with the LM's EOS token so the model learns to stop; batches are
padded dynamically to their longest caption, and padding is masked out of the loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from clipcap.modeling.retrieval import pad_left, pad_right, prompt_text


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each caption, truncated to ``max_tokens - 1`` and ending with EOS."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    return [ids[: max_tokens - 1] + [tokenizer.eos_token_id] for ids in encoded]


class EntityPrompts:
    """Each caption's prompt in training an entity-aware captioner: its image's retrieved captions (already
    cut) and the caption's own nouns, each left out with probability ``drop``, drawn anew every epoch from
    (seed, epoch, caption): the model learns to copy the entities it is given, and to caption without them."""

    def __init__(self, tokenizer, nouns: list[list[str]], drop: float, seed: int = 0,
                 retrieved: list[list[str]] | None = None, novel: float = 0.0) -> None:
        self.tokenizer, self.nouns, self.drop, self.seed, self.retrieved = tokenizer, nouns, drop, seed, retrieved
        self.novel = novel   # the share of prompts shown without retrieved captions, as a novel image's are

    def entities(self, index: int, epoch: int) -> list[str]:
        """The nouns of caption ``index`` kept in ``epoch``."""
        draw = random.Random(f"{self.seed}/{epoch}/{index}")   # str seeds hash the same in every process
        return [noun for noun in self.nouns[index] if draw.random() >= self.drop]

    def shows_retrieved(self, index: int, epoch: int) -> bool:
        """Whether caption ``index``'s prompt holds its image's retrieved captions in ``epoch``."""
        return self.retrieved is not None and random.Random(f"{self.seed}/{epoch}/{index}/novel").random() >= self.novel

    def __call__(self, index: int, image: int, epoch: int) -> list[int]:
        retrieved = self.retrieved[image] if self.shows_retrieved(index, epoch) else []
        text = prompt_text(retrieved, self.entities(index, epoch))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class CaptionPairs(Dataset):
    """(embedding, caption tokens[, prompt tokens]) pairs: one per caption, several per image.

    ``prompts`` holds each image's prompt (one token list per image: the retrieval prompt of a
    retrieval-augmented model), or is an :class:`EntityPrompts` drawing each caption's prompt per
    epoch (:meth:`set_epoch`); None for the paper's model.
    """

    def __init__(self, embeddings: torch.Tensor, image_index: list[int], token_ids: list[list[int]],
                 prompts: list[list[int]] | EntityPrompts | None = None) -> None:
        if len(image_index) != len(token_ids):
            raise ValueError("one image index per caption expected")
        if isinstance(prompts, list) and len(prompts) != len(embeddings):
            raise ValueError("one retrieval prompt per image expected")
        if isinstance(prompts, EntityPrompts) and len(prompts.nouns) != len(token_ids):
            raise ValueError("one list of nouns per caption expected")
        self.embeddings, self.image_index, self.token_ids, self.prompts = embeddings, image_index, token_ids, prompts
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int], list[int] | None]:
        image = self.image_index[index]
        if isinstance(self.prompts, EntityPrompts):
            return self.embeddings[image], self.token_ids[index], self.prompts(index, image, self.epoch)
        return self.embeddings[image], self.token_ids[index], None if self.prompts is None else self.prompts[image]

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


@dataclass
class CaptionBatch:
    embedding: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_ids: torch.Tensor | None = None      # left-padded retrieval prompts
    prompt_mask: torch.Tensor | None = None

    def _map(self, fn) -> CaptionBatch:
        return CaptionBatch(*(None if t is None else fn(t) for t in (self.embedding, self.input_ids, self.attention_mask,
                                                                      self.prompt_ids, self.prompt_mask)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CaptionBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CaptionBatch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of ``ClipCap.forward``."""
        return {"embedding": self.embedding, "input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask}


class PadCollator:
    """Pads token ids to the longest caption of the batch (not a global maximum); retrieval prompts
    are padded on the left, so that every prompt ends right where the model's input continues.
    ``multiple`` > 1 rounds lengths up to a multiple of it: a compiled model then sees a few static
    shapes instead of one per length."""

    def __init__(self, pad_token_id: int, multiple: int = 1) -> None:
        self.pad_token_id, self.multiple = pad_token_id, multiple

    def __call__(self, items: list[tuple]) -> CaptionBatch:
        """Items are (embedding, caption ids) or (embedding, caption ids, prompt ids or None)."""
        input_ids, mask = pad_right([item[1] for item in items], self.pad_token_id, self.multiple)
        prompts = [item[2] if len(item) > 2 else None for item in items]
        prompt_ids, prompt_mask = ((None, None) if prompts[0] is None
                                   else pad_left(prompts, self.pad_token_id, self.multiple))
        return CaptionBatch(torch.stack([item[0] for item in items]), input_ids, mask, prompt_ids, prompt_mask)


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of captions of similar length, so dynamic padding wastes little compute.

    Each epoch: shuffle, cut into groups of ``batch_size * group_batches``, sort each group by
    length, cut it into batches, and shuffle the batch order. The order depends only on
    ``seed`` and the epoch (:meth:`set_epoch`), so every process of a distributed run draws the
    same order and takes its own share (``rank::world_size``, equal counts), and a resumed run
    can skip the batches it has already seen.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group_batches: int = 8,
                 rank: int = 0, world_size: int = 1) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group = batch_size * group_batches
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw the order of ``epoch`` and leave out its first ``skip`` batches (of this process)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return math.ceil(len(self.lengths) / self.batch_size) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.group):
            group = sorted(order[start : start + self.group], key=self.lengths.__getitem__)
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        mine = batches[: len(self) * self.world_size][self.rank :: self.world_size]
        yield from mine[self.skip :]

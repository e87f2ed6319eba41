"""Retrieval augmentation, after SmallCap (Ramos et al., CVPR 2023): a datastore of captions keyed
by image embeddings, and the prompt that writes the captions of an image's k nearest neighbours
into the LM's input beside the image prefix.

The datastore is part of a captioner (``datastore.safetensors`` + ``datastore.json``): adding
captioned images to it changes what the captioner retrieves, without retraining. Search is exact
(cosine similarity, one matrix product per batch of queries).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path, write_json

EMBEDDINGS_FILE, CAPTIONS_FILE = "datastore.safetensors", "datastore.json"
PROMPT_HEAD, PROMPT_TAIL = "Similar images show:", "This image shows:"


@dataclass
class Retriever:
    """A captioner's datastore and how many of its captions go into each prompt."""

    datastore: CaptionDatastore
    k: int
    max_caption_tokens: int

    def captions(self, embeddings: torch.Tensor, query_ids: list[str] | None = None,
                 duplicate_similarity: float | None = None) -> list[list[str]]:
        return self.datastore.nearest(embeddings, self.k, query_ids, duplicate_similarity)

    def prompts(self, tokenizer, embeddings: torch.Tensor, query_ids: list[str] | None = None,
                duplicate_similarity: float | None = None) -> list[list[int]]:
        return prompt_token_ids(tokenizer, self.captions(embeddings, query_ids, duplicate_similarity),
                                self.max_caption_tokens)


@dataclass
class CaptionDatastore:
    """Captions keyed by the (unit-normalised) embedding of their image; several rows may share an image."""

    embeddings: torch.Tensor   # (N, e), unit L2 norm, float32
    captions: list[str]
    image_ids: list[str]

    @classmethod
    def build(cls, embeddings: torch.Tensor, captions: list[str], image_ids: list[str]) -> CaptionDatastore:
        if not (len(embeddings) == len(captions) == len(image_ids)):
            raise ValueError(f"{len(embeddings)} embeddings, {len(captions)} captions, {len(image_ids)} ids")
        return cls(F.normalize(embeddings.float(), dim=-1), list(captions), list(image_ids))

    def __len__(self) -> int:
        return len(self.captions)

    def add(self, embeddings: torch.Tensor, captions: list[str], image_ids: list[str]) -> CaptionDatastore:
        """A datastore with these entries appended (an entry already present, same image and caption, is skipped)."""
        known = set(zip(self.image_ids, self.captions))
        keep = [i for i, key in enumerate(zip(image_ids, captions)) if key not in known]
        more = CaptionDatastore.build(embeddings[keep], [captions[i] for i in keep], [image_ids[i] for i in keep])
        return CaptionDatastore(torch.cat([self.embeddings, more.embeddings]), self.captions + more.captions,
                                self.image_ids + more.image_ids)

    def nearest(self, queries: torch.Tensor, k: int, query_ids: list[str] | None = None,
                duplicate_similarity: float | None = None) -> list[list[str]]:
        """The captions of the ``k`` nearest entries of each query, nearest first, each caption once.

        Leave-one-out: an entry of the query's own image (``query_ids``) or as similar as
        ``duplicate_similarity`` (a re-encoded copy of it) is never returned.
        """
        if k == 0 or len(self) == 0:
            return [[] for _ in range(len(queries))]
        similarity = F.normalize(queries.float(), dim=-1) @ self.embeddings.T
        if duplicate_similarity is not None:
            similarity[similarity >= duplicate_similarity] = -2.0
        if query_ids is not None:
            row_of = {}
            for row, image_id in enumerate(self.image_ids):
                row_of.setdefault(image_id, []).append(row)
            for q, image_id in enumerate(query_ids):
                similarity[q, row_of.get(image_id, [])] = -2.0
        order = similarity.argsort(dim=1, descending=True, stable=True)
        out = []
        for q in range(len(queries)):
            found: list[str] = []
            for row in order[q].tolist():
                if similarity[q, row] <= -2.0 or len(found) == k:
                    break
                if self.captions[row] not in found:
                    found.append(self.captions[row])
            out.append(found)
        return out

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        with atomic_path(directory / EMBEDDINGS_FILE) as tmp:
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp))
        write_json(directory / CAPTIONS_FILE, {"captions": self.captions, "image_ids": self.image_ids})

    @classmethod
    def load(cls, directory: str | Path) -> CaptionDatastore:
        directory = Path(directory)
        try:
            embeddings = load_file(str(directory / EMBEDDINGS_FILE))["embeddings"]
            meta = json.loads((directory / CAPTIONS_FILE).read_text())
        except (OSError, ValueError, KeyError) as err:
            raise ClipcapError(f"{directory}: unreadable caption datastore ({err}); retrain, or restore "
                               f"{EMBEDDINGS_FILE} and {CAPTIONS_FILE}") from err
        if len(meta["captions"]) != len(embeddings):
            raise ClipcapError(f"{directory}: {len(embeddings)} datastore embeddings for {len(meta['captions'])} "
                               "captions; the two datastore files do not belong together")
        return cls(embeddings, meta["captions"], meta["image_ids"])


def prompt_text(captions: list[str]) -> str:
    """``Similar images show: A cat. A dog. This image shows:`` (each caption ends with a full stop)."""
    shown = [c if c.rstrip().endswith((".", "!", "?")) else c.rstrip() + "." for c in captions]
    return " ".join([PROMPT_HEAD, *shown, PROMPT_TAIL])


def prompt_token_ids(tokenizer, retrieved: list[list[str]], max_caption_tokens: int) -> list[list[int]]:
    """The prompt's token ids for each image (each retrieved caption cut to ``max_caption_tokens``)."""
    out = []
    for captions in retrieved:
        if not captions:
            out.append([])
            continue
        ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        cut = [tokenizer.decode(i[:max_caption_tokens]) for i in ids]
        out.append(tokenizer(prompt_text(cut), add_special_tokens=False)["input_ids"])
    return out


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sequences padded on the right to the longest."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sequences padded on the left to the longest (each ends at the last column)."""
    ids, mask = pad_right([s[::-1] for s in sequences], pad_id)
    return ids.flip(1), mask.flip(1)

"""Retrieval augmentation, after SmallCap (Ramos et al., CVPR 2023): a datastore of captions keyed
by image embeddings, and the prompt that writes the captions of an image's k nearest neighbours
into the LM's input beside the image prefix.

The datastore is part of a captioner (``datastore.safetensors`` + ``datastore.json``, and
``datastore.faiss`` for a large one): adding captioned images to it changes what the captioner
retrieves, without retraining. Search (cosine similarity = inner product of unit vectors) goes
through a faiss index built from the stored embeddings: exact (``IndexFlatIP``) up to
``approximate_above`` entries; above, an inverted file whose lists hold 4-bit product codes of the
residuals, scanned with SIMD lookups (``IVF<nlist>,PQ<m>x4fsr``, 168 bytes an entry at width 1280),
proposes ``RERANK`` candidates, which are re-scored exactly against the stored float32 embeddings.
That index takes minutes to build for a million entries, so it is saved beside the embeddings in
faiss's own format (never pickled) and read back while it matches them (benchmarks/retrieval_speed.py).

A datastore may search in a learned space (:class:`KeyProjection`, fitted to the training captions by
:mod:`clipcap.training.retrieval_metric`): images whose captions say the same thing are brought
together, so the neighbour found is the one whose caption fits. The stored embeddings stay the
encoder's own; keys and queries are projected, and copies of an image are still recognised by the
encoder's similarity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path, write_json

EMBEDDINGS_FILE, CAPTIONS_FILE, INDEX_FILE = "datastore.safetensors", "datastore.json", "datastore.faiss"
PROMPT_HEAD, PROMPT_TAIL = "Similar images show:", "This image shows:"
ENTITY_HEAD = "Objects:"     # an entity-aware captioner's prompt: "Objects: cat, cup." (clipcap.modeling.entities)
APPROXIMATE_ABOVE = 10_000   # entries; a store this size or smaller is searched exactly (benchmarks/retrieval_speed.py)
NPROBE = 16                  # inverted lists visited per query by the approximate index
RERANK = 256                 # candidates of the approximate index re-scored exactly per query
TRAIN_PER_LIST = 64          # k-means training vectors per inverted list (faiss wants >= 39)
FEW_QUERIES = 20             # searches of fewer queries run on one faiss thread (faiss's own BLAS threshold)
TIE = 1e-5                   # similarities this close count as equal where exactness is decided

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyProjection:
    """The learned search space of a datastore: ``normalize((x - center) @ weight)`` for a unit-normalised
    image embedding ``x`` (``center``: (e,), ``weight``: (e, m))."""

    center: torch.Tensor
    weight: torch.Tensor

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(embeddings.float(), dim=-1)
        return F.normalize((unit - self.center) @ self.weight, dim=-1).contiguous()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"projection.center": self.center.contiguous(), "projection.weight": self.weight.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> KeyProjection | None:
        if "projection.weight" not in tensors:
            return None
        return cls(tensors["projection.center"].float(), tensors["projection.weight"].float())


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
        return self.prompts_of(tokenizer, self.captions(embeddings, query_ids, duplicate_similarity))

    def prompts_of(self, tokenizer, retrieved: list[list[str]]) -> list[list[int]]:
        """The prompts (token ids) of captions :meth:`captions` already found."""
        return prompt_token_ids(tokenizer, retrieved, self.max_caption_tokens)


def nlist_for(entries: int) -> int:
    """Inverted lists of the approximate index: the power of two nearest sqrt(entries) (1024 for a million)."""
    return 2 ** max(4, round(math.log2(math.sqrt(max(entries, 1)))))


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """faiss on one OpenMP thread for a while (the calling thread's OpenMP setting). Training runs thousands of small k-means
    steps (hundreds of product-quantiser parts x 25 iterations) whose thread barriers cost more than
    they save: 3.5x slower on two threads than on one, measured on two cores shared with other work."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def pq_subquantizers(dim: int) -> int:
    """Product-quantiser parts of the approximate index: the most that leave at least 4 dimensions a
    part (320 for 1280: 4 bits a part, 160 bytes an entry). Coarser codes rank the candidates too
    roughly: on the benchmark's data (200,000 entries), re-scoring the first 256 candidates of 64 parts
    found 86% of the exact top 3, of 256 parts all of them."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def fingerprint(embeddings: torch.Tensor) -> str:
    """A cheap digest of a datastore's embeddings (their shape and every ~N/4096-th row) that ties a saved
    index to the embeddings it was built from."""
    digest = hashlib.sha256(repr(tuple(embeddings.shape)).encode())
    digest.update(embeddings[:: max(1, len(embeddings) // 4096)].contiguous().numpy().tobytes())
    digest.update(embeddings[-1:].contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def per_caption(captions_per_image) -> tuple[list[int], list[str]]:
    """One entry per caption of images with one or more captions each: (image index, caption) as two lists."""
    index = [i for i, captions in enumerate(captions_per_image) for _ in captions]
    return index, [c for captions in captions_per_image for c in captions]


def _entries(embeddings: torch.Tensor, captions_per_image, image_ids) -> tuple[torch.Tensor, list[str], list[str]]:
    """(embeddings, captions, image ids) with one row per caption of images with several captions each."""
    index, captions = per_caption(captions_per_image)
    image_ids = list(image_ids)
    return embeddings[index], captions, [image_ids[i] for i in index]


def _checked(embeddings: torch.Tensor, captions: list[str], image_ids: list[str]) -> torch.Tensor:
    if not (len(embeddings) == len(captions) == len(image_ids)):
        raise ValueError(f"{len(embeddings)} embeddings, {len(captions)} captions, {len(image_ids)} ids")
    return F.normalize(embeddings.float(), dim=-1).contiguous()


@dataclass(eq=False)
class CaptionDatastore:
    """Captions keyed by the (unit-normalised) embedding of their image; several rows may share an image.

    ``index`` (faiss) is built from the search keys when the datastore is made, unless it is given:
    exact search up to ``approximate_above`` entries, an approximate index visiting ``nprobe`` of its
    inverted lists per query above. The keys are the embeddings, or their ``projection`` (a learned
    space; queries are projected the same way).
    """

    embeddings: torch.Tensor   # (N, e), unit L2 norm, float32
    captions: list[str]
    image_ids: list[str]
    approximate_above: int = APPROXIMATE_ABOVE
    nprobe: int = NPROBE
    index: faiss.Index | None = field(default=None, repr=False)
    projection: KeyProjection | None = None
    keys: torch.Tensor | None = field(default=None, repr=False, compare=False)   # the search keys, when known

    def __post_init__(self) -> None:
        self.embeddings = self.embeddings.float().contiguous()
        if self.projection is not None and self.projection.weight.shape[0] != self.embeddings.shape[-1]:
            raise ValueError(f"a projection from width {self.projection.weight.shape[0]} for embeddings of "
                             f"width {self.embeddings.shape[-1]}")
        if self.keys is None:
            self.keys = self.embeddings if self.projection is None else self.projection(self.embeddings)
        if self.index is None:
            self.index = self._build_index()
        elif self.index.ntotal != len(self.keys) or self.index.d != self.keys.shape[-1]:
            raise ValueError(f"an index of {self.index.ntotal} x {self.index.d} for "
                             f"{tuple(self.keys.shape)} search keys")
        self._rows_of: dict[str, list[int]] | None = None

    @classmethod
    def build(cls, embeddings: torch.Tensor, captions: list[str], image_ids: list[str], *,
              approximate_above: int = APPROXIMATE_ABOVE, nprobe: int = NPROBE,
              projection: KeyProjection | None = None) -> CaptionDatastore:
        return cls(_checked(embeddings, captions, image_ids), list(captions), list(image_ids),
                   approximate_above, nprobe, projection=projection)

    @classmethod
    def of_images(cls, embeddings: torch.Tensor, captions_per_image, image_ids, **kwargs) -> CaptionDatastore:
        """A datastore of images with one or more captions each: one entry per caption."""
        return cls.build(*_entries(embeddings, captions_per_image, image_ids), **kwargs)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def approximate(self) -> bool:
        return len(self) > self.approximate_above

    @property
    def index_kind(self) -> str:
        return f"IVF{self._ivf().nlist},PQ{faiss.downcast_index(self.index).pq.M}x4fsr" if self.approximate else "Flat"

    def _ivf(self) -> faiss.IndexIVF:
        return faiss.extract_index_ivf(self.index)

    def _build_index(self) -> faiss.Index:
        vectors = self.keys.reshape(len(self.keys), -1).numpy()
        dim = vectors.shape[1]
        if not self.approximate:
            index = faiss.IndexFlatIP(dim)
            index.add(vectors)
            return index
        nlist = nlist_for(len(vectors))
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_subquantizers(dim)}x4fsr", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.spherical = True   # unit vectors: unit-norm centroids
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), nlist * TRAIN_PER_LIST), replace=False)
        with one_faiss_thread():
            index.train(vectors[np.sort(sample)])
        index.add(vectors)
        return index

    def add_images(self, embeddings: torch.Tensor, captions_per_image, image_ids) -> CaptionDatastore:
        """:meth:`add` for images with one or more captions each."""
        return self.add(*_entries(embeddings, captions_per_image, image_ids))

    def add(self, embeddings: torch.Tensor, captions: list[str], image_ids: list[str]) -> CaptionDatastore:
        """A datastore with these entries appended (an entry already present, same image and caption, is skipped).

        An approximate index keeps its trained inverted lists and takes the new entries in; an exact
        one, or a store that has just grown past ``approximate_above``, gets a new index."""
        if not (len(embeddings) == len(captions) == len(image_ids)):
            raise ValueError(f"{len(embeddings)} embeddings, {len(captions)} captions, {len(image_ids)} ids")
        known = set(zip(self.image_ids, self.captions))
        keep = [i for i, key in enumerate(zip(image_ids, captions)) if key not in known]
        more = _checked(embeddings[keep], [captions[i] for i in keep], [image_ids[i] for i in keep])
        index = None
        if self.approximate:
            index = faiss.deserialize_index(faiss.serialize_index(self.index))   # a copy: this store stays as it is
            index.add((more if self.projection is None else self.projection(more)).numpy())
        return CaptionDatastore(torch.cat([self.embeddings, more]), self.captions + [captions[i] for i in keep],
                                self.image_ids + [image_ids[i] for i in keep], self.approximate_above,
                                self.nprobe, index, self.projection)

    def _rows(self, image_id: str) -> list[int]:
        if self._rows_of is None:
            self._rows_of = {}
            for row, own in enumerate(self.image_ids):
                self._rows_of.setdefault(own, []).append(row)
        return self._rows_of.get(image_id, [])

    def _search(self, queries: np.ndarray, count: int, nprobe: int) -> np.ndarray:
        """Candidate rows (q, count), -1 past the last one the index found. A few queries search on one
        thread: the exact index splits a single query's scan across threads, and waiting for the
        second one cost ~20 ms a query where the cores were shared (24 ms on two threads, 4.4 on one,
        for 10,000 x 1280)."""
        with one_faiss_thread() if len(queries) < FEW_QUERIES else nullcontext():
            if self.approximate:
                return self.index.search(queries, count, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]
            return self.index.search(queries, count)[1]

    def _rescore(self, rows: np.ndarray, queries: np.ndarray, vectors: torch.Tensor | None = None) -> np.ndarray:
        """The exact similarity of each query to its candidate rows (q, count), -inf where there is none:
        in the search space, or of ``vectors`` (the encoder's embeddings, for copies of an image).

        A few products per query: numpy, on the calling thread (a thread pool costs more than it saves
        here, and contends with faiss's own); all entries at once past ~64 MB of candidates."""
        vectors = self.keys if vectors is None else vectors
        vectors, width = vectors.numpy(), vectors.shape[1]
        if rows.shape[1] * width > 1 << 24:
            similarity = np.stack([(vectors @ q)[r] for q, r in zip(queries, rows)])
        else:
            step = max(1, (1 << 24) // (rows.shape[1] * width))
            similarity = np.concatenate([np.einsum("qce,qe->qc", vectors[rows[i:i + step]], queries[i:i + step])
                                         for i in range(0, len(rows), step)])
        return np.where(rows >= 0, similarity, -np.inf)

    def nearest(self, queries: torch.Tensor, k: int, query_ids: list[str] | None = None,
                duplicate_similarity: float | None = None) -> list[list[str]]:
        """The captions of the ``k`` nearest entries of each query, nearest first, each caption once.

        Leave-one-out: an entry of the query's own image (``query_ids``) or as similar as
        ``duplicate_similarity`` (a re-encoded copy of it) is never returned.

        The index proposes ``2k + 8`` candidates plus the query's own entries (the approximate one at
        least ``RERANK``); they are re-scored exactly and walked nearest first (ties by row). A query
        whose walk runs out (exclusions, repeated captions), or, with the exact index, reaches the
        least similar candidate (entries as similar may have been left out) asks again for twice as
        many, and the approximate index then visits twice as many lists, until every entry was a candidate.
        """
        if k == 0 or len(self) == 0:
            return [[] for _ in range(len(queries))]
        if queries.shape[-1] != self.embeddings.shape[-1]:
            raise ValueError(f"queries of width {queries.shape[-1]} for a datastore of width {self.embeddings.shape[-1]}")
        queries = F.normalize(queries.detach().float().cpu(), dim=-1)
        originals = queries.numpy() if self.projection is not None else None   # copies are found by these
        if self.projection is not None:
            queries = self.projection(queries)
        queries = np.ascontiguousarray(queries.numpy())       # numpy from here on: no torch thread pool per call
        excluded = [set(self._rows(i)) for i in query_ids] if query_ids is not None else [set()] * len(queries)
        least = RERANK if self.approximate else 0
        wanted = [min(len(self), max(least, 2 * k + len(rows) + 8)) for rows in excluded]
        nprobe, lists = (self.nprobe, self._ivf().nlist) if self.approximate else (0, 0)
        out: list[list[str]] = [[] for _ in range(len(queries))]
        pending = list(range(len(queries)))
        while pending:
            count = max(wanted[q] for q in pending)
            every_entry = count >= len(self) and nprobe >= lists
            rows = self._search(queries[pending], count, nprobe)
            similarity = self._rescore(rows, queries[pending])
            copies = similarity if originals is None else self._rescore(rows, originals[pending], self.embeddings)
            order = np.lexsort((np.where(rows >= 0, rows, len(self)), -similarity))   # nearest first, ties by row
            rows = np.take_along_axis(rows, order, 1).tolist()
            similarity = np.take_along_axis(similarity, order, 1).tolist()
            copies = np.take_along_axis(copies, order, 1).tolist()
            again = []
            for q, q_rows, q_sims, q_copies in zip(pending, rows, similarity, copies):
                cut = -math.inf if every_entry or self.approximate else q_sims[-1] + TIE
                found: list[str] = []
                for row, sim, copy in zip(q_rows, q_sims, q_copies):
                    if row < 0 or len(found) == k or sim <= cut:
                        break
                    if row in excluded[q] or (duplicate_similarity is not None and copy >= duplicate_similarity):
                        continue
                    if self.captions[row] not in found:
                        found.append(self.captions[row])
                if len(found) == k or every_entry:
                    out[q] = found
                else:
                    wanted[q] = min(len(self), 2 * wanted[q])
                    again.append(q)
            if again and self.approximate:
                nprobe = min(lists, 2 * nprobe)
            pending = again
        return out

    def nearest_similarity(self, queries: torch.Tensor, query_ids: list[str] | None = None,
                           duplicate_similarity: float | None = None, chunk: int = 65_536) -> torch.Tensor:
        """Each query's cosine similarity, in the encoder's own space, to its nearest entry: how far an image
        is from everything the datastore holds (an entity-aware captioner's novelty signal). Leave-one-out
        like :meth:`nearest`: the query's own image's entries and copies of it are left out. Exact, over
        the stored embeddings in chunks of ``chunk`` entries."""
        queries = F.normalize(queries.detach().float().cpu(), dim=-1)
        best = torch.full((len(queries),), -1.0)
        for start in range(0, len(self), chunk):
            similarity = queries @ F.normalize(self.embeddings[start : start + chunk], dim=-1).T
            if duplicate_similarity is not None:
                similarity[similarity >= duplicate_similarity] = -1.0
            if query_ids is not None:
                for q, image in enumerate(query_ids):
                    own = [row - start for row in self._rows(image) if start <= row < start + chunk]
                    similarity[q, own] = -1.0
            best = torch.maximum(best, similarity.max(dim=-1).values)
        return best

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        with atomic_path(directory / EMBEDDINGS_FILE) as tmp:
            save_file({"embeddings": self.embeddings.contiguous(),
                       **(self.projection.tensors() if self.projection is not None else {})}, str(tmp))
        settings = {"kind": self.index_kind, "approximate_above": self.approximate_above, "nprobe": self.nprobe,
                    "space": "encoder" if self.projection is None else f"learned, width {self.keys.shape[1]}"}
        if self.approximate:
            with atomic_path(directory / INDEX_FILE) as tmp:
                faiss.write_index(self.index, str(tmp))
            settings |= {"file": INDEX_FILE, "fingerprint": fingerprint(self.keys)}
        else:
            (directory / INDEX_FILE).unlink(missing_ok=True)
        write_json(directory / CAPTIONS_FILE, {"captions": self.captions, "image_ids": self.image_ids,
                                               "index": settings})

    @classmethod
    def load(cls, directory: str | Path) -> CaptionDatastore:
        """The saved datastore, with its saved index where that was built from these embeddings (else a new one)."""
        directory = Path(directory)
        try:
            tensors = load_file(str(directory / EMBEDDINGS_FILE))
            embeddings, projection = tensors["embeddings"], KeyProjection.from_tensors(tensors)
            meta = json.loads((directory / CAPTIONS_FILE).read_text())
        except (OSError, ValueError, KeyError) as err:
            raise ClipcapError(f"{directory}: unreadable caption datastore ({err}); retrain, or restore "
                               f"{EMBEDDINGS_FILE} and {CAPTIONS_FILE}") from err
        if len(meta["captions"]) != len(embeddings):
            raise ClipcapError(f"{directory}: {len(embeddings)} datastore embeddings for {len(meta['captions'])} "
                               "captions; the two datastore files do not belong together")
        settings = meta.get("index", {})   # a datastore saved before the index: the defaults
        approximate_above = settings.get("approximate_above", APPROXIMATE_ABOVE)
        index = None
        embeddings = embeddings.float().contiguous()
        keys = embeddings if projection is None else projection(embeddings)
        if (len(embeddings) > approximate_above and settings.get("file") == INDEX_FILE and (directory / INDEX_FILE).exists()
                and settings.get("fingerprint") == fingerprint(keys)):
            try:
                index = faiss.read_index(str(directory / INDEX_FILE))
            except RuntimeError as err:
                log.warning("%s: unreadable (%s); building the index anew", directory / INDEX_FILE, err)
            if index is not None and (index.ntotal, index.d) != tuple(keys.shape):
                log.warning("%s does not match the embeddings; building the index anew", directory / INDEX_FILE)
                index = None
        return cls(embeddings, meta["captions"], meta["image_ids"], approximate_above,
                   settings.get("nprobe", NPROBE), index, projection, keys)


def prompt_text(captions: list[str], entities: list[str] | None = None) -> str:
    """``Similar images show: A cat. A dog. This image shows:`` (each caption ends with a full stop); with
    ``entities`` (an entity-aware captioner: a list, maybe empty), ``Objects: cat, dog.`` goes before the
    last sentence, which then always ends the prompt (``This image shows:`` alone when there is nothing)."""
    shown = [c if c.rstrip().endswith((".", "!", "?")) else c.rstrip() + "." for c in captions]
    parts = [PROMPT_HEAD, *shown] if shown else []
    if entities:
        parts.append(f"{ENTITY_HEAD} {', '.join(entities)}.")
    return " ".join([*parts, PROMPT_TAIL]) if parts or entities is not None else ""


def cut_captions(tokenizer, captions: list[str], max_caption_tokens: int) -> list[str]:
    """Each caption cut to its first ``max_caption_tokens`` tokens (the text a prompt shows of it)."""
    if not captions:
        return []
    ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(i[:max_caption_tokens]) for i in ids]


def prompt_token_ids(tokenizer, retrieved: list[list[str]] | None, max_caption_tokens: int,
                     entities: list[list[str]] | None = None) -> list[list[int]]:
    """The prompt's token ids for each image (each retrieved caption cut to ``max_caption_tokens``; with
    ``entities``, one list of nouns per image)."""
    images = len(retrieved) if retrieved is not None else len(entities)
    out = []
    for i in range(images):
        captions = cut_captions(tokenizer, retrieved[i], max_caption_tokens) if retrieved is not None else []
        text = prompt_text(captions, None if entities is None else entities[i])
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
    return out


def pad_right(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sequences padded on the right to the longest, rounded up to ``multiple``."""
    length = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_left(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sequences padded on the left to the longest (each ends at the last column)."""
    ids, mask = pad_right([s[::-1] for s in sequences], pad_id, multiple)
    return ids.flip(1), mask.flip(1)

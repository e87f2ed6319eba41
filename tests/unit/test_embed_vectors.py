"""vectors.json, what the stages after embed depend on: a digest of the manifest images' vectors that is blind
to which shard files hold them."""

from __future__ import annotations

import pytest
import torch

from clipcap.errors import ClipcapError
from clipcap.pipeline.embedding_store import EmbeddingStore
from clipcap.pipeline.stages.embed import vectors_summary

IDS = ["a", "b", "c", "d", "e"]


def _store(tmp_path, name: str, vectors: torch.Tensor, shards: list[list[int]]) -> EmbeddingStore:
    store = EmbeddingStore(tmp_path / name, "enc@1")
    for rows in shards:
        store.add([IDS[r] for r in rows], vectors[rows])
    return store


def test_the_same_vectors_in_other_shards_give_the_same_summary_and_one_bit_another(tmp_path):
    vectors = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    one = vectors_summary(_store(tmp_path, "one", vectors, [[0, 1, 2, 3, 4]]), IDS)
    assert one == {"encoder": "enc@1", "images": 5, "dim": 8, "dtype": "float32", "sha256": one["sha256"]}
    # a repair: the same vectors, written again in another order, into other shard files
    assert vectors_summary(_store(tmp_path, "two", vectors, [[3, 4], [2, 0, 1]]), IDS) == one
    assert vectors_summary(_store(tmp_path, "one", vectors, []), IDS + ["a"]) == one  # repeats count once
    flipped = vectors.clone()
    flipped.view(torch.int32)[2, 5] ^= 1  # the last bit of one value
    assert vectors_summary(_store(tmp_path, "flip", flipped, [[0, 1, 2, 3, 4]]), IDS)["sha256"] != one["sha256"]
    store = _store(tmp_path, "one", vectors, [])
    assert vectors_summary(store, IDS[::-1])["sha256"] != one["sha256"]  # the order the manifest gives
    assert vectors_summary(store, IDS[:4])["sha256"] != one["sha256"]    # an image fewer
    with pytest.raises(ClipcapError, match="'clipcap embed'"):
        vectors_summary(store, [*IDS, "new"])

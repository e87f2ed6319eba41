"""Retrieval augmentation: the datastore, leave-one-out search, the prompt, and a model whose
input holds the prompt (cached or not) - trained, decoded in batches and saved with its datastore."""

from __future__ import annotations

import pytest
import torch

from clipcap.config import DecodingConfig, MapperConfig
from clipcap.modeling.decode import generate_token_ids
from clipcap.modeling.model import ClipCap
from clipcap.modeling.retrieval import CaptionDatastore, pad_left, prompt_text
from clipcap.training.batches import PadCollator
from helpers import EOS, PAD, scramble_lm, tiny_lm


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_nearest_is_leave_one_out_and_skips_duplicates():
    base = randn(4, 8)
    store = CaptionDatastore.build(torch.cat([base, base[:1] * 2.0]), ["a", "b", "c", "d", "a copy"],
                                   ["i0", "i1", "i2", "i3", "i4"])
    assert store.nearest(base[:1], 1) == [["a"]]                         # itself (and its copy) first
    found = store.nearest(base[:1], 2, query_ids=["i0"], duplicate_similarity=0.999)
    assert "a" not in found[0] and "a copy" not in found[0] and len(found[0]) == 2
    ranked = (torch.nn.functional.normalize(base[1:], dim=-1) @ torch.nn.functional.normalize(base[0], dim=0))
    assert found[0][0] == ["b", "c", "d"][int(ranked.argmax())]          # nearest first
    assert store.nearest(base, 0) == [[], [], [], []]


def test_datastore_round_trip_and_add(tmp_path):
    store = CaptionDatastore.build(randn(3, 8), ["a", "b", "c"], ["x", "y", "z"])
    store.save(tmp_path)
    loaded = CaptionDatastore.load(tmp_path)
    assert loaded.captions == ["a", "b", "c"] and torch.equal(loaded.embeddings, store.embeddings)
    grown = loaded.add(randn(2, 8, seed=1), ["a", "new"], ["x", "w"])   # (x, a) is there already
    assert grown.captions == ["a", "b", "c", "new"] and len(grown.embeddings) == 4


def test_prompt_text_and_left_padding():
    assert prompt_text(["A cat.", "a dog"]) == "Similar images show: A cat. a dog. This image shows:"
    ids, mask = pad_left([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _model(order: str, finetune: bool = False) -> ClipCap:
    torch.manual_seed(0)
    cfg = MapperConfig(type="mlp", prefix_length=3, clip_length=2, num_layers=1, num_heads=2)
    return ClipCap(cfg, 16, tiny_lm(), finetune_lm=finetune, prompt_order=order)


def _batch():
    items = [(randn(16, seed=1), [5, 6, 7, EOS], [9, 10, 11, 12]), (randn(16, seed=2), [8, EOS], [13])]
    return PadCollator(PAD)(items)


def test_cached_prompt_loss_equals_one_pass_and_trains_the_mapper():
    model, batch = _model("prompt_first"), _batch()
    model.eval()                                               # no dropout: the two paths must agree exactly
    cached = model(**batch.model_inputs())                     # frozen LM, prompt first: the KV-cache path
    model.finetune_lm = True                                   # the same weights through the one-pass path
    one_pass = model(**batch.model_inputs())
    model.finetune_lm = False
    torch.testing.assert_close(cached, one_pass)
    cached.backward()
    assert all(p.grad is not None for p in model.mapper.parameters())
    assert all(p.grad is None for p in model.lm.parameters())


@pytest.mark.parametrize("order", ["prompt_first", "prefix_first"])
def test_padding_never_changes_a_row(order):
    """A row's loss is the same alone and in a batch whose other prompt is longer (left padding)."""
    model, batch = _model(order), _batch()
    model.eval()
    items = [(randn(16, seed=2), [8, EOS], [13])]
    alone = model(**PadCollator(PAD)(items).model_inputs())
    both = PadCollator(PAD)([(randn(16, seed=1), [8, EOS], [9, 10, 11, 12]), *items])
    per_row = [model(**PadCollator(PAD)([item]).model_inputs()) for item in
               [(randn(16, seed=1), [8, EOS], [9, 10, 11, 12]), *items]]
    torch.testing.assert_close(model(**both.model_inputs()), torch.stack(per_row).mean())
    torch.testing.assert_close(per_row[1], alone)


@pytest.mark.parametrize("order", ["prompt_first", "prefix_first"])
def test_batched_greedy_with_prompts_equals_one_image_at_a_time(order):
    model = scramble_lm(_model(order), mapper=True).eval()
    embeddings = randn(4, 16, seed=3) * 3
    prompts = [[9, 10, 11], [12], [13, 14], [15, 16, 17, 18]]
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=6)
    ids, mask = pad_left(prompts, PAD)
    batched = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=greedy,
                                 prompt_ids=ids, prompt_mask=mask)
    for row in range(4):
        one_ids, one_mask = pad_left(prompts[row : row + 1], PAD)
        single = generate_token_ids(model, embeddings[row : row + 1], eos_token_id=EOS, pad_token_id=PAD,
                                    decoding=greedy, prompt_ids=one_ids, prompt_mask=one_mask)[0].tolist()
        assert batched[row].tolist()[: len(single)] == single
    assert len({tuple(r) for r in batched.tolist()}) > 1
    without = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=greedy)
    assert not torch.equal(without, batched)                   # the prompt is really in the input


def test_a_caption_is_its_first_line():
    from clipcap.modeling.decode import first_line

    assert first_line("  A hibiscus flower.\n\nHibiscus is a type of flowering plant.") == "A hibiscus flower."
    assert first_line("A cat.") == "A cat." and first_line("\n") == ""


def test_per_caption_losses_are_each_rows_own_loss():
    model, batch = _model("prompt_first"), _batch()
    model.eval()
    per_caption = model(**batch.model_inputs(), per_caption=True)
    rows = [(randn(16, seed=1), [5, 6, 7, EOS], [9, 10, 11, 12]), (randn(16, seed=2), [8, EOS], [13])]
    alone = torch.stack([model(**PadCollator(PAD)([row]).model_inputs()) for row in rows])
    torch.testing.assert_close(per_caption, alone)

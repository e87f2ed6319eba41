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


def brute_force_nearest(store: CaptionDatastore, queries: torch.Tensor, k: int, query_ids=None,
                        duplicate_similarity=None) -> list[list[str]]:
    """The search as one matrix product and a full sort (the datastore's behaviour before faiss)."""
    similarity = torch.nn.functional.normalize(queries.float(), dim=-1) @ store.embeddings.T
    out = []
    for q in range(len(queries)):
        found: list[str] = []
        for row in similarity[q].argsort(descending=True, stable=True).tolist():
            sim = float(similarity[q, row])
            if len(found) == k:
                break
            if (query_ids is not None and store.image_ids[row] == query_ids[q]) or (
                    duplicate_similarity is not None and sim >= duplicate_similarity):
                continue
            if store.captions[row] not in found:
                found.append(store.captions[row])
        out.append(found)
    return out


def clustered(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """Unit vectors around random centres (real image embeddings have neighbourhoods; uniform noise has none)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(randn(clusters, dim, seed=99), dim=-1)
    points = centres[torch.randint(clusters, (n,), generator=g)] + 0.35 * torch.randn(n, dim, generator=g) / dim ** 0.5
    return torch.nn.functional.normalize(points, dim=-1)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_faiss_exact_search_equals_brute_force(k):
    n = 300
    vectors = randn(n, 24, seed=5)
    captions = [f"c{row % 16}" for row in range(n)]            # repeated captions: each must come once
    image_ids = [f"i{row // 3}" for row in range(n)]           # three entries per image
    store = CaptionDatastore.build(vectors, captions, image_ids)
    assert store.index_kind == "Flat" and not store.approximate
    queries = torch.cat([randn(30, 24, seed=6), vectors[::25] * 1.0001])   # new images and stored ones
    ids = [f"new{q}" for q in range(30)] + [image_ids[row] for row in range(0, n, 25)]
    assert store.nearest(queries, k) == brute_force_nearest(store, queries, k)
    loo = store.nearest(queries, k, query_ids=ids, duplicate_similarity=0.999)
    assert loo == brute_force_nearest(store, queries, k, query_ids=ids, duplicate_similarity=0.999)
    assert all(len(found) == k for found in loo)
    # more than there is: every distinct caption once, nearest first
    assert store.nearest(queries[:2], 100) == brute_force_nearest(store, queries[:2], 100)
    assert sorted(store.nearest(queries[:1], 100)[0]) == sorted(set(captions))


def test_approximate_index_above_the_threshold_finds_the_exact_neighbours():
    vectors, queries = clustered(6000, 32, 150, seed=1), clustered(200, 32, 150, seed=2)
    captions, image_ids = [f"c{row}" for row in range(6000)], [f"i{row}" for row in range(6000)]
    exact = CaptionDatastore.build(vectors, captions, image_ids)
    approx = CaptionDatastore.build(vectors, captions, image_ids, approximate_above=5000, nprobe=4)
    assert approx.approximate and approx.index_kind.startswith("IVF") and approx.index_kind.endswith("x4fsr")
    truth, found = exact.nearest(queries, 3), approx.nearest(queries, 3)
    recall = sum(len(set(t) & set(f)) for t, f in zip(truth, found)) / (3 * len(queries))
    assert 0.9 <= recall <= 1.0, recall
    assert all(len(f) == 3 for f in found)
    # leave-one-out holds: a stored entry queried under its own id never comes back
    rows = list(range(0, 6000, 97))
    loo = approx.nearest(vectors[rows], 3, query_ids=[image_ids[r] for r in rows], duplicate_similarity=0.999)
    assert all(captions[r] not in f and len(f) == 3 for r, f in zip(rows, loo))
    # exhausting the probed lists widens the search until every entry was a candidate
    assert len(approx.nearest(queries[:1], 5999, query_ids=["i0"])[0]) == 5999


def test_add_keeps_a_trained_approximate_index_and_crossing_the_threshold_builds_one():
    vectors = clustered(3000, 16, 60, seed=3)
    approx = CaptionDatastore.build(vectors, [f"c{r}" for r in range(3000)], [f"i{r}" for r in range(3000)],
                                    approximate_above=1000)
    centroids = approx._ivf().quantizer.reconstruct_n(0, approx._ivf().nlist)
    new = clustered(2, 16, 60, seed=4)
    grown = approx.add(new, ["fresh", "c0"], ["n0", "i0"])      # (i0, c0) is there already
    assert len(grown) == 3001 and grown.index.ntotal == 3001 and approx.index.ntotal == 3000
    assert (grown._ivf().quantizer.reconstruct_n(0, grown._ivf().nlist) == centroids).all()
    assert grown.nearest(new[:1], 1) == [["fresh"]]
    small = CaptionDatastore.build(vectors[:1000], [f"c{r}" for r in range(1000)], [f"i{r}" for r in range(1000)],
                                   approximate_above=1000)
    assert small.index_kind == "Flat"
    assert small.add(new[:1], ["fresh"], ["n0"]).index_kind.startswith("IVF")


@pytest.mark.parametrize("approximate_above", [100_000, 1000])
def test_saved_and_loaded_datastore_searches_identically(tmp_path, monkeypatch, approximate_above):
    vectors, queries = clustered(2500, 16, 50, seed=7), clustered(60, 16, 50, seed=8)
    store = CaptionDatastore.build(vectors, [f"c{r % 2000}" for r in range(2500)], [f"i{r // 2}" for r in range(2500)],
                                   approximate_above=approximate_above, nprobe=3)
    store.save(tmp_path)
    saved = (tmp_path / "datastore.faiss").exists()
    assert saved == store.approximate                           # only the slow-to-build index is saved
    if saved:                                                   # read back, not rebuilt
        monkeypatch.setattr(CaptionDatastore, "_build_index", lambda self: pytest.fail("rebuilt a saved index"))
    loaded = CaptionDatastore.load(tmp_path)
    monkeypatch.undo()
    assert (loaded.approximate_above, loaded.nprobe, loaded.index_kind) == (approximate_above, 3, store.index_kind)
    ids = [f"i{r // 2}" for r in range(60)]
    assert loaded.nearest(queries, 3) == store.nearest(queries, 3)
    assert loaded.nearest(queries, 3, ids, 0.999) == store.nearest(queries, 3, ids, 0.999)


def test_a_saved_index_that_no_longer_matches_the_embeddings_is_rebuilt(tmp_path, monkeypatch):
    vectors = clustered(2000, 16, 40, seed=9)
    names = [f"c{r}" for r in range(2000)]
    CaptionDatastore.build(vectors, names, names, approximate_above=1000, nprobe=2).save(tmp_path)
    other = tmp_path / "other"
    CaptionDatastore.build(vectors.flip(0), names, names, approximate_above=1000, nprobe=2).save(other)
    (other / "datastore.safetensors").replace(tmp_path / "datastore.safetensors")   # embeddings swapped under it
    built = []
    build_index = CaptionDatastore._build_index
    monkeypatch.setattr(CaptionDatastore, "_build_index", lambda self: built.append(1) or build_index(self))
    loaded = CaptionDatastore.load(tmp_path)
    assert built == [1]
    assert loaded.nearest(vectors[:5], 1) == [[names[1999 - r]] for r in range(5)]


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
    assert first_line("Plus. This image shows: This image shows:") == "Plus."
    assert first_line("A dog. Similar images show: A cat.") == "A dog."
    assert first_line("Pen. Objects: clock.") == "Pen." and first_line("Happy! Objects: pick.") == "Happy!"


def test_per_caption_losses_are_each_rows_own_loss():
    model, batch = _model("prompt_first"), _batch()
    model.eval()
    per_caption = model(**batch.model_inputs(), per_caption=True)
    rows = [(randn(16, seed=1), [5, 6, 7, EOS], [9, 10, 11, 12]), (randn(16, seed=2), [8, EOS], [13])]
    alone = torch.stack([model(**PadCollator(PAD)([row]).model_inputs()) for row in rows])
    torch.testing.assert_close(per_caption, alone)


@pytest.mark.parametrize("order", ["prompt_first", "prefix_first", None])
def test_scoring_many_captions_per_image_equals_each_pair_alone(order):
    """caption_nll runs each image's context once and copies its cache to every caption of that
    image: the likelihoods are those of the training loss, one (image, caption) pair at a time."""
    from clipcap.modeling.decode import caption_nll

    model = scramble_lm(_model(order or "prompt_first"), mapper=True).eval()
    embeddings = randn(3, 16, seed=5) * 3
    prompts = None if order is None else [[9, 10, 11], [12], [13, 14, 15, 16]]
    captions = {"a": [20, 21], "b": [22], "c": [23, 24, 25, 26], "d": [27, 20]}
    owner = [0, 0, 0, 1, 2, 2]
    texts = ["a", "b", "c", "d", "a", "c"]

    class Tokenizer:  # each text is a name for a fixed token sequence
        eos_token_id, pad_token_id = EOS, PAD

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [captions[t] for t in texts]}

    tokenizer = Tokenizer()
    scored = caption_nll(model, tokenizer, embeddings, texts, owner=owner, prompts=prompts, batch_size=2)
    for j, (image, text) in enumerate(zip(owner, texts)):
        item = (embeddings[image], captions[text] + [EOS], None if prompts is None else prompts[image])
        alone = model(**PadCollator(PAD)([item]).model_inputs(), per_caption=True)
        torch.testing.assert_close(scored[j], alone[0], rtol=1e-4, atol=1e-4)
    assert len({round(float(x), 4) for x in scored}) == len(texts)   # the pairs really differ
    with pytest.raises(ValueError, match="owner"):
        caption_nll(model, tokenizer, embeddings, texts, owner=[0, 0, 0, 1, 2, 3], prompts=prompts)


@pytest.mark.parametrize("decoding", [DecodingConfig(num_beams=3, num_captions=2, max_new_tokens=6),
                                      DecodingConfig(strategy="sample", num_captions=3, max_new_tokens=6)])
def test_sharing_the_context_across_beams_changes_no_caption(decoding, monkeypatch):
    """generate_token_ids runs the prompt and prefix once per image, not once per beam or sample."""
    from clipcap.modeling import decode

    model = scramble_lm(_model("prompt_first"), mapper=True).eval()
    embeddings = randn(4, 16, seed=3) * 3
    ids, mask = pad_left([[9, 10, 11], [12], [13, 14], [15, 16, 17, 18]], PAD)
    runs = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(decode, "shared_context_cache", lambda *args: None)
        torch.manual_seed(0)
        runs.append(generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=decoding,
                                       prompt_ids=ids, prompt_mask=mask))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape[0] == 4 * decoding.num_captions and len({tuple(r) for r in runs[0].tolist()}) > 2

"""The learned retrieval space: fitted to captions, it finds the image whose caption fits where the
encoder's own similarity finds one that merely looks alike; stored with the datastore, searched
the same way after saving, growing and on an approximate index, and copies still recognised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipcap.errors import ClipcapError
from clipcap.modeling.retrieval import CaptionDatastore, KeyProjection
from clipcap.training.retrieval_metric import caption_similarity, fit_key_projection

CLASSES = ["The letter A.", "The letter B.", "A red apple.", "A green pear.", "A black cat.", "A small dog."]


def styled_images(per_class: int, seed: int, shift: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Images whose content (what the caption says) is a weak signal and whose style (font, colour:
    four styles shared across classes) a strong one. Class c is drawn in styles c + shift and
    c + shift + 1 (mod 4): training images with shift 0, test images with shift 2, so by the
    encoder's similarity a test image's nearest training image has its style and another content."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(len(CLASSES), 32, generator=torch.Generator().manual_seed(100))
    styles = torch.randn(4, 32, generator=torch.Generator().manual_seed(101))
    embeddings, captions = [], []
    for c, caption in enumerate(CLASSES):
        for i in range(per_class):
            style = styles[(c + shift + i % 2) % 4]
            embeddings.append(0.5 * content[c] + 2.0 * style + 0.3 * torch.randn(32, generator=g))
            captions.append([caption])
    return torch.stack(embeddings), captions


def hit_rate(store: CaptionDatastore, queries: torch.Tensor, captions: list[list[str]]) -> float:
    found = store.nearest(queries, 1)
    return sum(f[0] == c[0] for f, c in zip(found, captions)) / len(captions)


def test_the_learned_space_finds_the_caption_where_the_encoder_finds_the_style():
    train, train_captions = styled_images(12, seed=0, shift=0)
    test, test_captions = styled_images(4, seed=1, shift=2)
    ids = [str(i) for i in range(len(train))]
    cosine = CaptionDatastore.of_images(train, train_captions, ids)
    projection = fit_key_projection(train, train_captions, dim=16, temperature=0.1, steps=300, seed=0)
    learned = CaptionDatastore.of_images(train, train_captions, ids, projection=projection)
    assert hit_rate(cosine, test, test_captions) < 0.5
    assert hit_rate(learned, test, test_captions) > 0.9


def test_the_fit_is_repeatable_and_seeded():
    train, captions = styled_images(5, seed=0, shift=0)
    first = fit_key_projection(train, captions, dim=8, temperature=0.1, steps=20, seed=3)
    again = fit_key_projection(train, captions, dim=8, temperature=0.1, steps=20, seed=3)
    other = fit_key_projection(train, captions, dim=8, temperature=0.1, steps=20, seed=4)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.center, again.center)
    assert first.weight.shape == (32, 8) and not torch.equal(first.weight, other.weight)
    keys = first(train)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(len(train)))


def test_one_image_is_too_few_to_learn_from():
    with pytest.raises(ClipcapError, match="retrieval.metric: cosine"):
        fit_key_projection(torch.randn(1, 8), [["A cat."]], dim=4, temperature=0.1, steps=5, seed=0)


def test_caption_similarity_weighs_shared_rare_words():
    similarity = caption_similarity([["The letter A."], ["The letter B."], ["A red apple."], ["the letter a"]])
    assert torch.allclose(similarity.diag(), torch.ones(4)) and torch.allclose(similarity, similarity.T)
    assert similarity[0, 3] == pytest.approx(1.0)                  # case and punctuation aside, the same caption
    assert similarity[0, 1] > similarity[0, 2] >= 0                # "the letter" shared; nothing shared


@pytest.mark.parametrize("approximate_above", [10_000, 100])
def test_a_projected_datastore_searches_the_same_after_saving_and_growing(tmp_path, monkeypatch, approximate_above):
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(300, 32, generator=g)
    projection = KeyProjection(torch.zeros(32), torch.randn(32, 8, generator=g))
    store = CaptionDatastore.build(embeddings, [f"c{i}" for i in range(300)], [f"i{i}" for i in range(300)],
                                   approximate_above=approximate_above, projection=projection)
    queries = torch.randn(20, 32, generator=g)
    brute = (projection(queries) @ projection(embeddings).T).argmax(1).tolist()
    assert [f[0] for f in store.nearest(queries, 1)] == [f"c{i}" for i in brute]
    store.save(tmp_path)
    if store.approximate:   # its saved index is read back (it matches the projected keys), not rebuilt
        monkeypatch.setattr(CaptionDatastore, "_build_index", lambda self: pytest.fail("rebuilt a saved index"))
    loaded = CaptionDatastore.load(tmp_path)
    monkeypatch.undo()
    assert loaded.projection is not None and torch.equal(loaded.projection.weight, projection.weight)
    assert torch.equal(loaded.embeddings, store.embeddings)   # the encoder's embeddings are what is stored
    assert loaded.nearest(queries, 3) == store.nearest(queries, 3)
    grown = loaded.add(queries[:1] * 3.0, ["new"], ["q0"])
    assert grown.projection is projection or torch.equal(grown.projection.weight, projection.weight)
    assert grown.nearest(queries[:1], 1) == [["new"]]


def test_copies_are_recognised_by_the_encoders_similarity_not_the_learned_one():
    """Leave-one-out in training skips re-encoded copies of the query (encoder similarity >= the
    threshold); images that merely share a caption come close in the learned space and must stay."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, generator=g)
    squash = KeyProjection(torch.zeros(16), torch.ones(16, 2))   # everything in one direction: all similar
    store = CaptionDatastore.build(torch.cat([base, base[:1] * 2.0]), ["a", "b", "c", "a copy"],
                                   ["i0", "i1", "i2", "i3"], projection=squash)
    found = store.nearest(base[:1], 3, query_ids=["i0"], duplicate_similarity=0.999)[0]
    assert "a copy" not in found and sorted(found) == ["b", "c"]
    assert F.normalize(base[1], dim=0) @ F.normalize(base[0], dim=0) < 0.999

"""Entity-aware captions: the heads that name entities, the prompts that carry them, the training draw
that drops them, and a captioner that uses the ones its head names (saved and loaded with it)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data

from clipcap.config import Config, ConfigError, EntitiesConfig, LMConfig, MapperConfig, RetrievalConfig
from clipcap.modeling.captioner import Captioner, save_captioner
from clipcap.modeling.decode import GREEDY, caption_nll, generate_captions
from clipcap.modeling.encoders import build_encoder, encode_images
from clipcap.modeling.entities import (EntityHead, EntitySettings, classifier_head, imagenet_general, imagenet_kinds,
                                       imagenet_nouns,
                                       zero_shot_head)
from clipcap.modeling.labels import encoder_labels
from clipcap.modeling.lms import load_lm
from clipcap.modeling.model import ClipCap
from clipcap.modeling.retrieval import prompt_text, prompt_token_ids
from clipcap.pipeline.entity_heads import build_entity_head, nouns_of_captions
from clipcap.training.batches import CaptionPairs, EntityPrompts
from clipcap.training.tagger import fit_tagger

LM = "tiny-gpt2:n_layer=1,n_embd=32"


def _head(nouns, weight, activation="softmax", threshold=0.2, top_k=3, bias=None) -> EntityHead:
    return EntityHead(EntitySettings("classifier", nouns, activation, 1.0, False, top_k, threshold),
                      torch.tensor(weight, dtype=torch.float), None if bias is None else torch.tensor(bias))


def test_a_softmax_head_sums_the_classes_of_one_noun():
    """Two cat classes at 0.3 each outrank one dog class at 0.4: the noun's probability is the sum."""
    logits = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))
    head = _head(["cat", "cat", "dog"], torch.eye(3).tolist())
    probabilities = head.noun_probabilities(logits)
    assert head.settings.vocabulary == ["cat", "dog"]
    torch.testing.assert_close(probabilities, torch.tensor([[0.6, 0.4]]))
    assert head.entities(logits) == [["cat", "dog"]]


def test_a_general_noun_adds_up_the_classes_it_gathers_beside_their_own_nouns():
    """No class is a person, but a uniform (0.35), a suit (0.15) and a tie (0.1) are worn: "person" (0.6) comes
    first, each class still counts for its own noun, and a class outside the general noun adds nothing to it."""
    logits = torch.log(torch.tensor([[0.35, 0.15, 0.1, 0.4]]))
    settings = EntitySettings("classifier", ["uniform", "suit", "tie", "bobsled"], "softmax", 1.0, False, 3, 0.2,
                              general={"person": [0, 1, 2]})
    head = EntityHead(settings, torch.eye(4))
    assert settings.vocabulary == ["uniform", "suit", "tie", "bobsled", "person"]
    torch.testing.assert_close(head.noun_probabilities(logits), torch.tensor([[0.35, 0.15, 0.1, 0.4, 0.6]]))
    assert head.entities(logits) == [["person", "bobsled", "uniform"]]
    with pytest.raises(ValueError, match="among the head's 4"):
        EntitySettings("classifier", ["uniform", "suit", "tie", "bobsled"], general={"person": [0, 4]})
    with pytest.raises(ValueError, match="softmax"):
        EntitySettings("tagger", ["cat"], "sigmoid", general={"animal": [0]})


def test_imagenet_general_nouns_gather_people_and_what_they_wear_and_buildings():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    general = {noun: {_IMAGENET_CATEGORIES[i] for i in classes} for noun, classes in imagenet_general().items()}
    assert {"military uniform", "suit", "football helmet", "scuba diver", "groom"} <= general["person"]
    assert {"stupa", "palace", "monastery", "church"} <= general["building"]
    assert "daisy" in general["flower"]
    assert not general["person"] & {"bobsled", "Egyptian cat", "espresso", "bell cote"}


def test_imagenet_kinds_name_each_noun_more_broadly_or_narrowly():
    """WordNet's words for a noun's own kinds (up to the too general ones: no "animal", "device") and for the
    kinds under it that the corpus uses."""
    kinds = {noun: set(words) for noun, words in imagenet_kinds().items()}
    assert set(kinds) == set(imagenet_nouns()) | set(imagenet_general())
    assert {"aircraft", "airplane", "jet"} <= kinds["plane"]
    assert {"girl", "woman", "doctor", "child"} <= kinds["person"]
    assert {"puppy", "terrier", "hound", "canid"} <= kinds["dog"] and {"motorcycle", "bike"} <= kinds["moped"]
    assert {"cathedral", "castle", "barn"} <= kinds["building"] and "citrus" in kinds["lemon"]
    assert not kinds["person"] & {"bear", "cat", "hat"} and not kinds["dog"] & {"animal", "cat", "wolf"}
    assert not kinds["plane"] & {"device", "vehicle", "bird"} and all(noun not in kinds[noun] for noun in kinds)


def test_threshold_and_top_k_choose_the_entities():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.3, 0.24, 0.24, 0.22]]))
    nouns = ["cat", "dog", "cup", "hat"]
    assert _head(nouns, torch.eye(4).tolist(), threshold=0.2).entities(logits) == [["cat", "dog"], ["cat", "dog", "cup"]]
    assert _head(nouns, torch.eye(4).tolist(), threshold=0.23).entities(logits) == [["cat", "dog"], ["cat", "dog", "cup"]]
    assert _head(nouns, torch.eye(4).tolist(), threshold=0.245).entities(logits) == [["cat", "dog"], ["cat"]]
    assert _head(nouns, torch.eye(4).tolist(), threshold=0.26).entities(logits) == [["cat"], ["cat"]]
    assert _head(nouns, torch.eye(4).tolist(), threshold=0.0, top_k=1).entities(logits) == [["cat"], ["cat"]]
    assert _head(nouns, torch.eye(4).tolist(), threshold=0.6).entities(logits) == [[], []]


def test_a_sigmoid_head_takes_each_nouns_own_probability():
    head = _head(["cat", "dog"], torch.eye(2).tolist(), activation="sigmoid", threshold=0.5)
    found = head.entities(torch.tensor([[3.0, 2.0], [-3.0, 0.5], [-1.0, -1.0], [0.0, -1.0]]))
    assert found == [["cat", "dog"], ["dog"], [], ["cat"]]       # the last at exactly the threshold (0.5): kept


def test_a_head_saves_and_loads_with_its_settings(tmp_path):
    head = _head(["cat", "cat", "dog"], torch.randn(3, 5).tolist(), bias=[0.1, 0.2, 0.3], threshold=0.1)
    settings = head.save(tmp_path)
    loaded = EntityHead.load(tmp_path, settings)
    x = torch.randn(6, 5)
    torch.testing.assert_close(loaded.noun_probabilities(x), head.noun_probabilities(x))
    assert loaded.entities(x) == head.entities(x) and loaded.settings == head.settings


@pytest.mark.parametrize(("imagenet_class", "noun"), [
    (281, "cat"), (285, "cat"), (967, "coffee"), (339, "horse"), (162, "dog"), (948, "apple"), (954, "banana"),
    (294, "bear"), (665, "moped"), (289, "leopard"), (125, "crab"), (968, "cup"), (817, "car"), (436, "wagon"),
    # the whole name where its last word names another kind of thing
    (150, "sea lion"), (338, "guinea pig"), (313, "walking stick"), (928, "ice cream"), (761, "remote control")])
def test_imagenet_classes_map_to_everyday_nouns(imagenet_class, noun):
    nouns = imagenet_nouns()
    assert len(nouns) == 1000 and nouns[imagenet_class] == noun


def grace_hopper() -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        return Image.open(handle).convert("RGB")


def test_the_classifier_names_a_real_cat_coffee_and_person_by_their_everyday_nouns():
    """skimage's cat is "Egyptian cat" (0.79) to EfficientNet-Lite0, with tabby and tiger cat after it:
    their sum names "cat"; the coffee ("espresso") names "coffee"; Grace Hopper (military uniform 0.39, suit,
    bulletproof vest, Windsor tie: what she wears) names "person"."""
    encoder = build_encoder("efficientnet-lite0")
    head = classifier_head(encoder_labels(encoder).head, top_k=3, threshold=0.2)
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()), grace_hopper()]
    embeddings = torch.cat(list(encode_images(encoder, photos, batch_size=3)))
    cat, coffee, officer = head.entities(embeddings)
    assert cat[0] == "cat" and coffee[0] == "coffee"
    assert officer[0] == "person" and "uniform" in officer   # no class is a person; her uniform, suit, tie are worn
    assert head.noun_probabilities(embeddings)[0].max() > encoder_labels(encoder).top(embeddings, 1)[0][0].probability


def test_zero_shot_entities_come_from_an_open_clip_text_tower():
    """A tiny random open_clip model: the head is the vocabulary's prompt-ensembled text embeddings, so an
    image embedding equal to one noun's text embedding names that noun first."""
    encoder = build_encoder("open_clip:RN50")
    vocabulary = ["cat", "rocket", "flower"]
    head = zero_shot_head(encoder.encode_text, vocabulary, top_k=1, threshold=0.0)
    assert head.weight.shape == (3, encoder.dim) and head.settings.temperature == 0.01
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(3))
    assert head.entities(head.weight * 7.0) == [["cat"], ["rocket"], ["flower"]]
    single = torch.nn.functional.normalize(encoder.encode_text(["a photo of a rocket."]), dim=-1)
    assert not torch.allclose(head.weight[1], single[0])     # the ensemble, not one template


def test_a_tagger_fitted_on_caption_nouns_names_the_nouns_of_new_images():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=generator) * 3
    labels = [0, 1, 2] * 20
    embeddings = centers[labels] + torch.randn(60, 16, generator=generator) * 0.3
    nouns = [[{"cat"}, {"dog", "ball"}, {"cup"}][label] for label in labels]
    head = fit_tagger(embeddings, nouns, steps=200, threshold=0.5)
    assert set(head.settings.vocabulary) == {"cat", "dog", "ball", "cup"}
    fresh = centers + torch.randn(3, 16, generator=generator) * 0.3
    cat, dog, cup = head.entities(fresh)
    assert cat == ["cat"] and set(dog) == {"dog", "ball"} and cup == ["cup"]
    # fitted on unit embeddings, it reads any length as its direction (the encoder's are not unit length)
    torch.testing.assert_close(head.noun_probabilities(fresh / 100), head.noun_probabilities(fresh))
    assert fit_tagger(embeddings, [set()] * 60) is None


def test_training_nouns_are_the_captions_own():
    assert nouns_of_captions([["A cat.", "Cats on a mat."], ["A dog."]]) == [["cat"], ["cat", "mat"], ["dog"]]


def test_prompts_carry_the_entities_after_the_retrieved_captions():
    assert prompt_text(["A cat."], ["cat", "cup"]) == "Similar images show: A cat. Objects: cat, cup. This image shows:"
    assert prompt_text([], ["cat"]) == "Objects: cat. This image shows:"
    assert prompt_text([], []) == "This image shows:"           # an entity-aware prompt is never empty
    assert prompt_text(["A cat."], []) == "Similar images show: A cat. This image shows:"
    assert prompt_text([]) == ""                                  # the paper's model: no prompt


def test_training_drops_each_entity_independently_and_anew_each_epoch():
    tokenizer = load_lm(LM, "smollm2-135m").tokenizer
    nouns = [["cat", "dog", "cup", "hat", "sun"]] * 400
    prompts = EntityPrompts(tokenizer, nouns, drop=0.4, seed=0)
    kept = [prompts.entities(i, epoch=0) for i in range(400)]
    share = sum(map(len, kept)) / (5 * 400)
    assert 0.55 < share < 0.65                                           # ~1 - 0.4 of them kept
    assert len({tuple(k) for k in kept}) > 10                            # each caption its own draw
    assert sum(k == [] for k in kept) > 0 and sum(len(k) == 5 for k in kept) > 0
    again = [prompts.entities(i, epoch=1) for i in range(400)]
    assert sum(a != b for a, b in zip(kept, again)) > 200                # drawn anew each epoch
    assert kept == [prompts.entities(i, epoch=0) for i in range(400)]    # and reproducibly
    assert all(k == [n for n in nouns[0] if n in k] for k in kept)      # in the caption's order
    assert EntityPrompts(tokenizer, nouns, drop=0.0).entities(3, 0) == nouns[0]


def test_caption_pairs_build_each_captions_prompt_for_the_epoch():
    tokenizer = load_lm(LM, "smollm2-135m").tokenizer
    prompts = EntityPrompts(tokenizer, [["cat", "dog", "cup"]] * 4, drop=0.5, seed=3, retrieved=[["A fox."], ["A hen."]])
    pairs = CaptionPairs(torch.randn(2, 4), [0, 0, 1, 1], [[1, 2]] * 4, prompts)
    seen = set()
    for epoch in range(6):
        pairs.set_epoch(epoch)
        text = tokenizer.decode(pairs[2][2])
        assert text == prompt_text(["A hen."], prompts.entities(2, epoch))
        seen.add(text)
    assert len(seen) > 1


def _captioner(entities: EntityHead | None, retrieval=False) -> Captioner:
    lm = load_lm(LM, "smollm2-135m", seed=1)
    torch.manual_seed(0)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 4, lm.model).eval()
    config = {"retrieval": {"k": 0}}
    return Captioner(model, lm.tokenizer, config, None, entities=entities)


def test_the_captioner_captions_with_the_entities_its_head_names(tmp_path):
    """Greedy captions of an entity-aware captioner are the model's captions given the prompts of the
    entities its head names - not the captions without them, nor with other entities."""
    head = _head(["cat", "rocket", "flower", "dog"], torch.eye(4).tolist(), threshold=0.3, top_k=1)
    captioner = _captioner(head)
    embeddings = torch.eye(4) * 5
    assert captioner.entities(embeddings) == [["cat"], ["rocket"], ["flower"], ["dog"]]
    expected = prompt_token_ids(captioner.tokenizer, None, 0, [["cat"], ["rocket"], ["flower"], ["dog"]])
    assert captioner.prompts(embeddings, None) == expected
    decoding = dataclasses.replace(GREEDY, max_new_tokens=6)
    got = captioner.caption_embeddings(embeddings, decoding)
    assert got == generate_captions(captioner.model, captioner.tokenizer, embeddings, decoding, 4, expected)
    without = generate_captions(captioner.model, captioner.tokenizer, embeddings, decoding, 4, None)
    assert got != without                                   # the prompt changes what it says
    captions = ["A cat."] * 4                               # and so does which entity it names
    nll = caption_nll(captioner.model, captioner.tokenizer, embeddings, captions, prompts=expected)
    other = caption_nll(captioner.model, captioner.tokenizer, embeddings, captions, prompts=expected[::-1])
    assert not torch.allclose(nll, other)


def test_an_entity_aware_captioner_saves_and_loads_its_head(tmp_path):
    lm = load_lm(LM, "smollm2-135m", seed=1)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 4, lm.model)
    head = _head(["cat", "dog"], torch.randn(2, 4).tolist(), threshold=0.0)
    save_captioner(tmp_path / "m", model, encoder="efficientnet-lite0", lm_name=LM, tokenizer_name="smollm2-135m",
                   lm_pretrained=False, entities=head)
    loaded = Captioner.load(tmp_path / "m")
    x = torch.randn(5, 4)
    assert loaded.entity_head is not None and loaded.entities(x) == head.entities(x)
    assert "entities.safetensors" in loaded.config["files"]
    assert Captioner.load(_saved_plain(tmp_path / "plain")).entities(x) is None


def _saved_plain(folder):
    lm = load_lm(LM, "smollm2-135m", seed=1)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 4, lm.model)
    return save_captioner(folder, model, encoder="efficientnet-lite0", lm_name=LM, tokenizer_name="smollm2-135m",
                          lm_pretrained=False)


def test_the_entity_source_is_built_from_params(tmp_path):
    rows = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "captions": [["A cat."], ["A cat."], ["A dog."], ["A dog."]]})
    embeddings = torch.randn(4, 1280)
    base = Config(lm=LMConfig(name=LM), retrieval=RetrievalConfig(k=0), entities=EntitiesConfig(source="none"))
    assert build_entity_head(base, rows, embeddings) is None
    tagger = build_entity_head(dataclasses.replace(base, entities=EntitiesConfig(source="tagger")), rows, embeddings)
    assert tagger.settings.source == "tagger" and set(tagger.settings.vocabulary) == {"cat", "dog"}
    classifier = build_entity_head(dataclasses.replace(base, entities=EntitiesConfig(source="classifier", top_k=2)),
                                   rows, embeddings)
    assert classifier.settings.source == "classifier" and classifier.settings.top_k == 2
    with pytest.raises(ConfigError, match="open_clip"):
        build_entity_head(dataclasses.replace(base, entities=EntitiesConfig(source="zero_shot")), rows, embeddings)
    with pytest.raises(ConfigError, match="width 16"):       # embeddings of another encoder than its classifier's
        build_entity_head(dataclasses.replace(base, entities=EntitiesConfig(source="classifier")), rows,
                          torch.randn(4, 16))


@pytest.mark.parametrize(("field", "value"), [("drop", 1.0), ("drop", -0.1), ("threshold", 1.5), ("top_k", 0),
                                              ("temperature", 0.0), ("novel_confidence", 0.0),
                                              ("novel_confidence", 1.5), ("novel_precision", 0.0), ("novel_share", 1.0),
                                              ("novel_precision", 1.5), ("familiar_quantile", 0.05),
                                              ("familiar_quantile", 1.0), ("in_prompt", "some")])
def test_bad_entity_params_name_the_key(field, value):
    with pytest.raises(ConfigError, match=f"entities.{field}"):
        EntitiesConfig(**{field: value})


@pytest.mark.parametrize("k, share", [(0, None), (1, None), (1, 0.4)])
def test_the_train_stage_trains_on_each_captions_own_nouns_dropped_and_validates_on_named_ones(tmp_path, monkeypatch,
                                                                                              k, share):
    """Training pairs carry the caption's own nouns through an EntityPrompts at entities.drop; the val
    pairs carry the entities the head names (as at inference); the saved captioner holds the head. With
    retrieval, a share novel_share (null: novel_quantile) of training prompts go without retrieved captions
    and the head stores the similarity below which an image is novel."""
    import clipcap.pipeline.stages.train as stage
    from clipcap.config import DatasetConfig, TrainConfig
    from clipcap.pipeline.entity_heads import calibrated_confidence
    from clipcap.pipeline.layout import Layout

    monkeypatch.chdir(tmp_path)
    cfg = Config(dataset=DatasetConfig(name="toy"), lm=LMConfig(name=LM, tokenizer="smollm2-135m"),
                 mapper=MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2),
                 retrieval=RetrievalConfig(k=k, metric="cosine"), train=TrainConfig(epochs=1, batch_size=4),
                 entities=EntitiesConfig(source="tagger", drop=0.3, threshold=0.0, top_k=1, novel_quantile=0.25,
                                         novel_share=share, familiar_quantile=0.75, novel_confidence=0.7,
                                         novel_precision=0.4, in_prompt="novel"))
    animals = ["cat", "dog", "hen", "fox"]
    rows = pd.DataFrame({"image_id": [f"i{n}" for n in range(20)],
                         "captions": [[f"A {animals[n % 4]} on a mat."] for n in range(20)]})
    embeddings = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))[[n % 4 for n in range(20)]] * 3
    val = rows.iloc[:4].assign(image_id=[f"v{n}" for n in range(4)])
    monkeypatch.setattr(stage, "split_data", lambda *args: [(rows, embeddings), (val, embeddings[:4])])
    seen = []
    real_train_model = stage.train_model

    def train_model(model, pairs, val_pairs, *args, **kwargs):
        seen.append((pairs, val_pairs))
        return real_train_model(model, pairs, val_pairs, *args, **kwargs)

    monkeypatch.setattr(stage, "train_model", train_model)
    stage.run(cfg, tracking=False)
    [(pairs, val_pairs)] = seen
    assert isinstance(pairs.prompts, EntityPrompts) and pairs.prompts.drop == 0.3
    assert pairs.prompts.nouns == [[animals[n % 4], "mat"] for n in range(20)]
    tokenizer = load_lm(LM, "smollm2-135m").tokenizer
    head = Captioner.load(Layout.of("toy").model).entity_head
    assert head is not None and head.settings.source == "tagger"
    named = head.entities(embeddings[:4])
    if k == 0:
        assert pairs.prompts.novel == 0.0 and head.settings.novel_similarity is None
        assert [tokenizer.decode(p) for p in val_pairs.prompts] == [prompt_text([], found) for found in named]
        return
    assert pairs.prompts.novel == (0.25 if share is None else share) and pairs.prompts.retrieved is not None
    assert -1.0 <= head.settings.novel_similarity < head.settings.familiar_similarity <= 1.0
    assert head.settings.in_prompt == "novel"      # and novel_confidence from the head on the training images:
    assert head.settings.novel_confidence == calibrated_confidence(head, embeddings, rows["captions"], 0.4)
    assert head.settings.novel_confidence not in (None, 0.7)
    # the val images are the training images' own directions: familiar, so (in_prompt: novel) no entities
    assert all(tokenizer.decode(p).startswith("Similar images show:") and "Objects:" not in tokenizer.decode(p)
               for p in val_pairs.prompts)


def test_nearest_similarity_is_the_encoders_cosine_to_the_nearest_other_image():
    from clipcap.modeling.retrieval import CaptionDatastore

    generator = torch.Generator().manual_seed(0)
    stored = torch.randn(50, 8, generator=generator)
    store = CaptionDatastore.build(stored, [f"c{i}" for i in range(50)], [f"i{i}" for i in range(50)])
    queries = torch.randn(5, 8, generator=generator)
    cosine = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(stored, dim=-1).T
    torch.testing.assert_close(store.nearest_similarity(queries), cosine.max(dim=-1).values)
    torch.testing.assert_close(store.nearest_similarity(queries, chunk=7), cosine.max(dim=-1).values)
    own = store.nearest_similarity(stored[:3], ["i0", "i1", "i2"])          # leave-one-out: never itself
    itself = torch.nn.functional.normalize(stored[:3], dim=-1) @ torch.nn.functional.normalize(stored, dim=-1).T
    itself[torch.arange(3), torch.arange(3)] = -1
    torch.testing.assert_close(own, itself.max(dim=-1).values)
    assert (store.nearest_similarity(stored[:3] * 2, duplicate_similarity=0.999) < 0.999).all()   # nor a copy


def test_a_novel_image_is_prompted_with_its_entities_alone():
    """Beside a datastore, an image less similar to its nearest entry than novel_similarity gets no
    retrieved captions in its prompt (and no rerank against them); a familiar one keeps them."""
    from clipcap.modeling.captioner import novel_prompts
    from clipcap.modeling.retrieval import CaptionDatastore, Retriever

    stored = torch.eye(4)[:2] * 3                                 # the datastore holds two directions
    store = CaptionDatastore.build(stored, ["A fox.", "A hen."], ["a", "b"])
    head = _head(["cat", "rocket", "flower", "dog"], torch.eye(4).tolist(), threshold=0.3, top_k=1)
    head.settings = dataclasses.replace(head.settings, novel_similarity=0.5)
    captioner = _captioner(head)
    captioner.retriever = Retriever(store, 1, 24)
    queries = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])   # near "a"; like nothing stored
    retrieved = captioner.retriever.captions(queries)
    assert retrieved == [["A fox."], ["A fox."]]
    kept, entities = novel_prompts(store, queries, retrieved, head.name(queries), head.settings)
    assert kept == [["A fox."], []] and entities == [["cat"], ["flower"]]
    expected = prompt_token_ids(captioner.tokenizer, kept, 24, entities)
    decoding = dataclasses.replace(GREEDY, max_new_tokens=5)
    assert captioner.caption_embeddings(queries, decoding) == generate_captions(
        captioner.model, captioner.tokenizer, queries, decoding, 2, expected)
    assert captioner.tokenizer.decode(expected[1]) == "Objects: flower. This image shows:"
    never = dataclasses.replace(head.settings, novel_similarity=None, novel_confidence=0.01)
    assert novel_prompts(store, queries, retrieved, head.name(queries), never) == (retrieved, entities)  # no threshold stored
    only_novel = dataclasses.replace(head.settings, in_prompt="novel")   # a familiar image: its neighbours alone
    assert novel_prompts(store, queries, retrieved, head.name(queries), only_novel) == (kept, [[], ["flower"]])
    captioner.entity_head.settings = only_novel
    assert captioner.caption_embeddings(queries, decoding) == generate_captions(
        captioner.model, captioner.tokenizer, queries, decoding, 2,
        prompt_token_ids(captioner.tokenizer, kept, 24, [[], ["flower"]]))


def test_a_confident_noun_no_retrieved_caption_names_makes_a_less_familiar_image_novel():
    """A new kind of thing among familiar-looking ones (a food stamp among toy stamps): novel when it is less
    similar than familiar_similarity and the head is at least novel_confidence sure of a noun none of its
    retrieved captions names; not when one names it (as a lemma), nor when the head is less sure, nor when
    the image is at least as close as familiar_similarity (its neighbours are trusted)."""
    from clipcap.modeling.entities import Named, novel_images

    settings = dataclasses.replace(_head(["cat"], [[1.0]]).settings, novel_similarity=0.5, novel_confidence=0.6,
                                   familiar_similarity=0.8)
    named = [Named(["pear"], "pear", 0.9), Named(["pear"], "pear", 0.9), Named(["pear"], "pear", 0.59),
             Named(["pear"], "pear", 0.6), Named([], "pear", 0.1), Named(["pear"], "pear", 0.9),
             Named(["pear"], "pear", 0.9)]
    retrieved = [["A duck."], ["A duck.", "Two pears."], ["A duck."], ["A duck."], ["Two pears."], ["A duck."],
                 ["A duck."]]
    near = [0.7, 0.7, 0.7, 0.7, 0.49, 0.8, 0.79]
    assert novel_images(named, retrieved, near, settings) == [True, False, False, True, True, False, True]
    for off in (dataclasses.replace(settings, novel_confidence=None), dataclasses.replace(settings, familiar_similarity=None)):
        assert novel_images(named, retrieved, near, off) == [False, False, False, False, True, False, False]
    # exactly as similar as novel_similarity: not novel by distance (and the head too unsure for the other rule)
    assert novel_images([Named([], "pear", 0.1)], [["A duck."]], [0.5], settings) == [False]
    # a neighbour naming the noun more broadly ("Aircraft.") or narrowly ("Manga girl.") names it: not novel
    sure = [Named(["plane"], "plane", 0.9), Named(["person"], "person", 0.9), Named(["person"], "person", 0.9)]
    titles, near = [["Aircraft."], ["Manga girl."], ["A teddy bear."]], [0.7, 0.7, 0.7]
    assert novel_images(sure, titles, near, settings) == [True, True, True]
    kinds = dataclasses.replace(settings, kinds={"plane": ["aircraft", "jet"], "person": ["girl", "doctor"]})
    assert novel_images(sure, titles, near, kinds) == [False, False, True]


def test_a_novel_image_without_a_likely_noun_is_prompted_with_its_likeliest():
    """Nothing close in the datastore and no noun at the threshold: its likeliest noun, not a free text."""
    from clipcap.modeling.captioner import novel_prompts
    from clipcap.modeling.retrieval import CaptionDatastore, Retriever

    store = CaptionDatastore.build(torch.eye(4)[:1] * 3, ["A fox."], ["a"])
    head = _head(["cat", "rocket", "flower", "dog"], torch.eye(4).tolist(), threshold=0.8, top_k=2)
    head.settings = dataclasses.replace(head.settings, novel_similarity=0.5)
    queries = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0]])   # familiar; novel and unsure
    named = head.name(queries)
    assert named[1].entities == [] and named[1].likeliest == "rocket" and 0.3 < named[1].probability < 0.8
    retrieved, entities = novel_prompts(store, queries, [["A fox."], ["A fox."]], named, head.settings)
    assert retrieved == [["A fox."], []] and entities == [["cat"], ["rocket"]]
    captioner = _captioner(head)
    captioner.retriever = Retriever(store, 1, 24)
    decoding = dataclasses.replace(GREEDY, max_new_tokens=5)
    assert captioner.caption_embeddings(queries, decoding) == generate_captions(
        captioner.model, captioner.tokenizer, queries, decoding, 2, prompt_token_ids(captioner.tokenizer, retrieved, 24, entities))


def test_training_shows_a_share_of_prompts_without_their_retrieved_captions():
    tokenizer = load_lm(LM, "smollm2-135m").tokenizer
    prompts = EntityPrompts(tokenizer, [["cat"]] * 1000, drop=0.0, retrieved=[["A fox."]], novel=0.1)
    shown = [prompts.shows_retrieved(i, 0) for i in range(1000)]
    assert 50 < shown.count(False) < 150
    index = shown.index(False)
    assert tokenizer.decode(prompts(index, 0, 0)) == "Objects: cat. This image shows:"
    assert tokenizer.decode(prompts(shown.index(True), 0, 0)) == "Similar images show: A fox. Objects: cat. This image shows:"
    assert all(EntityPrompts(tokenizer, [["cat"]] * 50, 0.0, retrieved=[["A fox."]]).shows_retrieved(i, 0) for i in range(50))
    later = [prompts.shows_retrieved(i, 1) for i in range(1000)]      # drawn anew each epoch, at the same share
    assert 50 < later.count(False) < 150 and later != shown


def test_the_likeliest_beam_that_names_an_entity_is_kept():
    from clipcap.modeling.entities import likeliest_naming, names_any

    beams = ["A wheelbarrow.", "Two cats on a mat.", "A cat.", "A catapult."]
    assert likeliest_naming(beams, ["cat"]) == "Two cats on a mat."       # lemmas: cats names cat
    assert likeliest_naming(beams, ["dog"]) == "A wheelbarrow."            # none does: the best beam
    assert likeliest_naming(beams, ["mat", "cat"]) == "Two cats on a mat."
    assert likeliest_naming(beams[1:], ["cat"]) == "Two cats on a mat."    # the best beam, when it names one
    assert not names_any("A catapult.", ["cat"]) and names_any("A fire truck.", ["fire truck"])
    assert not names_any("A truck.", ["fire truck"])


def test_an_image_prompted_with_entities_alone_keeps_its_likeliest_naming_beam():
    """Beam search with rerank: an entity-only prompt's caption is the likeliest of all beams that names
    an entity (the best beam when none does) - the same beams generate_captions gives for that prompt."""
    from clipcap.modeling.entities import likeliest_naming

    head = _head(["cat", "rocket", "flower", "dog"], torch.eye(4).tolist(), threshold=0.3, top_k=1)
    captioner = _captioner(head)
    embeddings = torch.eye(4) * 5
    decoding = dataclasses.replace(GREEDY, strategy="beam", num_beams=4, max_new_tokens=4, rerank=True)
    prompts = captioner.prompts(embeddings, None)
    beams = generate_captions(captioner.model, captioner.tokenizer, embeddings,
                              dataclasses.replace(decoding, num_captions=4, rerank=False), 4, prompts)
    expected = [[likeliest_naming(found, nouns)] for found, nouns in zip(beams, captioner.entities(embeddings))]
    assert captioner.caption_embeddings(embeddings, decoding) == expected


def test_the_rerank_keeps_a_later_beam_that_names_the_entity_over_a_likelier_one_that_does_not(monkeypatch):
    """The beams a tiny random model writes name no entity, so the test above cannot tell the rule from the
    best beam: here beam search's beams are given, and the image the head calls a cat keeps "A cat on a mat."
    (its third beam), the one it calls a dog - named by no beam - its best."""
    from clipcap.modeling import captioner as captioner_module

    head = _head(["cat", "dog"], torch.eye(2).tolist(), threshold=0.3, top_k=1)
    captioner = _captioner(head)
    beams = [["A wheelbarrow.", "A catapult.", "A cat on a mat.", "Two cats."]] * 2
    asked = []

    def given_beams(model, tokenizer, embeddings, decoding, batch_size, prompts, max_time=None):
        asked.append((decoding.num_captions, prompts))
        return beams

    monkeypatch.setattr(captioner_module, "generate_captions", given_beams)
    decoding = dataclasses.replace(GREEDY, strategy="beam", num_beams=4, max_new_tokens=4, rerank=True)
    embeddings = torch.eye(2) * 5
    assert captioner.caption_embeddings(embeddings, decoding) == [["A cat on a mat."], ["A wheelbarrow."]]
    assert asked == [(4, captioner.prompts(embeddings, None))]     # all beams, of the entities' prompts


def test_inference_settings_sets_the_novelty_rule_only_beside_a_datastore():
    """One function sets a head's inference settings for training and for a kept captioner: top_k and
    threshold always; in_prompt and the novelty thresholds (the quantiles of the training images'
    nearest-neighbour similarities, and novel_confidence as given or calibrated on the training images)
    only with a datastore; none with novel_quantile 0."""
    from clipcap.modeling.entities import EntitySettings
    from clipcap.modeling.retrieval import CaptionDatastore
    from clipcap.pipeline.entity_heads import calibrated_confidence, inference_settings, neighbour_similarities

    embeddings = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    ids = [f"i{n}" for n in range(40)]
    captions = [["A cat."]] * 40
    store = CaptionDatastore.build(embeddings, [f"c{n}" for n in range(40)], ids)
    stored = EntitySettings(source="tagger", nouns=["cat", "dog"], top_k=1, threshold=0.9, novel_similarity=0.5,
                            familiar_similarity=0.6)
    head = EntityHead(stored, torch.randn(2, 8, generator=torch.Generator().manual_seed(2)))
    wanted = EntitiesConfig(source="tagger", top_k=2, threshold=0.3, novel_quantile=0.2, familiar_quantile=0.6,
                            novel_confidence=0.7, novel_precision=None, in_prompt="novel")

    alone = inference_settings(head, wanted, None, embeddings, ids, captions, 0.99)
    assert (alone.top_k, alone.threshold, alone.in_prompt) == (2, 0.3, "all")
    assert alone.novel_similarity is None and alone.familiar_similarity is None

    beside = inference_settings(head, wanted, store, embeddings, ids, captions, 0.99, seed=3)
    assert beside.in_prompt == "novel" and beside.novel_confidence == 0.7
    assert [beside.novel_similarity, beside.familiar_similarity] == neighbour_similarities(
        store, embeddings, ids, [0.2, 0.6], 0.99, seed=3)
    assert beside.novel_similarity < beside.familiar_similarity

    calibrated = inference_settings(head, dataclasses.replace(wanted, novel_precision=0.5), store, embeddings, ids,
                                    captions, 0.99, seed=3)
    assert calibrated.novel_confidence == calibrated_confidence(head, embeddings, captions, 0.5)
    assert calibrated.novel_confidence not in (None, 0.7)

    never = inference_settings(head, dataclasses.replace(wanted, novel_quantile=0.0), store, embeddings, ids,
                               captions, 0.99)
    assert never.in_prompt == "novel" and never.novel_similarity is None and never.familiar_similarity is None
    assert head.settings == stored                       # the head's own settings are left as they were


def test_novel_confidence_is_where_the_head_is_right_often_enough_on_the_training_images():
    """calibrated_confidence: over the training images sorted by the head's confidence in its likeliest
    noun, the lowest confidence down to which that noun is in the image's own caption for at least
    ``precision`` of them (counted over at least ``min_images``); None when it never is."""
    from clipcap.pipeline.entity_heads import calibrated_confidence

    head = _head(["cat", "dog"], [[1.0, 0.0], [0.0, 0.0]])
    logits = torch.tensor([3.0 - 0.1 * n for n in range(30)])        # the head sure of cat, less and less
    probabilities = torch.sigmoid(logits).tolist()
    # the 10 surest are cats, the next 20 are not (their captions name no cat), given in a shuffled order
    captions = [["A dog.", "A cat on a mat."] if n < 10 else ["A dog."] for n in range(30)]  # any caption
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    embeddings = torch.stack([torch.tensor([logits[n], 0.0]) for n in order])
    shuffled = [captions[n] for n in order]

    def confidence(precision, min_images=20):
        return calibrated_confidence(head, embeddings, shuffled, precision, min_images)

    assert confidence(0.5) == pytest.approx(probabilities[19])   # 10 of the surest 20: exactly a half
    assert confidence(0.51) is None                              # never that often over 20 or more
    assert confidence(1.0) is None and confidence(1.0, min_images=5) == pytest.approx(probabilities[9])
    assert confidence(0.3) == pytest.approx(probabilities[29])   # 10 of 30: down to the least sure
    assert confidence(0.4) == pytest.approx(probabilities[24])   # 10 of 25



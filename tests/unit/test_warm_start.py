"""A retrain starts from the champion's weights only when the champion has this recipe (only the data grew)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipcap.config import (Config, DatasetConfig, EntitiesConfig, LMConfig, MapperConfig, RegisterConfig, RetrainConfig,
                            RetrievalConfig)
from clipcap.modeling.captioner import save_captioner
from clipcap.modeling.lms import load_lm
from clipcap.modeling.model import ClipCap
from clipcap.pipeline.registry import log_and_register
from clipcap.pipeline.warm_start import find_warm_start, recipe

LM = "tiny-gpt2:n_layer=1,n_embd=32"


@pytest.fixture
def cfg(tmp_path, monkeypatch) -> Config:
    monkeypatch.chdir(tmp_path)
    return Config(dataset=DatasetConfig(name="toy"), encoder=dataclasses.replace(Config().encoder, name="efficientnet-lite0"),
                  lm=LMConfig(name=LM, tokenizer="smollm2-135m"),
                  mapper=MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2),
                  retrieval=RetrievalConfig(k=0), entities=EntitiesConfig(source="none"),
                  register=RegisterConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))


def _champion(cfg: Config, folder, with_recipe=True, recorded: dict | None = None) -> ClipCap:
    """A registered champion recording ``recorded`` as its recipe (default: ``cfg``'s)."""
    lm = load_lm(LM, "smollm2-135m", seed=1)
    torch.manual_seed(0)
    model = ClipCap(cfg.mapper, 1280, lm.model)
    save_captioner(folder, model, encoder=cfg.encoder.name, lm_name=LM, tokenizer_name="smollm2-135m",
                   lm_pretrained=False, extra={"recipe": recorded or recipe(cfg)} if with_recipe else None)
    log_and_register(cfg.register, "toy", folder, {}, {"model_CIDEr": 0.5}, {}, [], example_image="x.png",
                     test_set="t")
    return model


def test_no_store_or_no_champion_means_from_scratch(cfg, tmp_path):
    found = find_warm_start(cfg)
    assert (found.source, found.reason, found.weights) == (None, "no champion yet", None)
    assert not (tmp_path / "mlflow.db").exists()  # asking created no store


def test_the_champion_with_the_same_recipe_is_the_start(cfg, tmp_path):
    champion = _champion(cfg, tmp_path / "champion")
    found = find_warm_start(cfg)
    assert found.source == "models:/clipcap-toy/1" and "same recipe" in found.reason
    state = champion.state_dict()  # every saved tensor is the champion's (the mapper's and the LM's)
    assert champion.weights().keys() <= found.weights.keys() and "mapper.prefix_const" in found.weights
    assert all(torch.equal(found.weights[k], state[k]) for k in found.weights)
    assert found.describe(2) == {"from": "models:/clipcap-toy/1", "reason": found.reason, "epochs": 2}


@pytest.mark.parametrize(("change", "named"), [
    (lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, lr=0.01)), "train.lr"),
    (lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, seed=7)), "train.seed"),
    (lambda c: dataclasses.replace(c, mapper=dataclasses.replace(c.mapper, num_layers=2)), "mapper.num_layers"),
    (lambda c: dataclasses.replace(c, retrieval=RetrievalConfig(k=1)), "retrieval.k"),
])
def test_another_recipe_means_from_scratch_and_says_what_differs(cfg, tmp_path, change, named):
    _champion(cfg, tmp_path / "champion")
    found = find_warm_start(change(cfg))
    assert found.source is None and found.weights is None and named in found.reason


def test_a_champion_from_before_an_option_existed_is_the_start_while_the_option_is_null(cfg, tmp_path):
    """A champion registered before ``entities.novel_precision`` existed records no such key: with the
    option at its default (null) the recipes agree and the retrain warm-starts; set, they differ."""
    older = recipe(cfg)
    del older["entities"]["novel_precision"]
    _champion(cfg, tmp_path / "champion", recorded=older)
    assert cfg.entities.novel_precision is None and find_warm_start(cfg).source == "models:/clipcap-toy/1"
    calibrated = dataclasses.replace(cfg, entities=dataclasses.replace(cfg.entities, novel_precision=0.4))
    found = find_warm_start(calibrated)
    assert found.source is None and "entities.novel_precision" in found.reason


def test_where_and_how_fast_it_runs_do_not_matter(cfg, tmp_path):
    _champion(cfg, tmp_path / "champion")
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu", compile=True, keep_checkpoints=5))
    assert find_warm_start(other).source == "models:/clipcap-toy/1"


def test_switched_off_or_an_old_champion_without_a_recipe_means_from_scratch(cfg, tmp_path):
    _champion(cfg, tmp_path / "champion", with_recipe=False)
    assert "records no training recipe" in find_warm_start(cfg).reason
    off = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, warm_start=False))
    assert find_warm_start(off).reason == "retrain.warm_start is off"


def test_a_retrieval_champion_brings_its_training_images_and_its_retrieval_space(cfg, tmp_path):
    from clipcap.modeling.retrieval import CaptionDatastore, KeyProjection

    with_retrieval = dataclasses.replace(cfg, retrieval=RetrievalConfig(k=1))
    lm = load_lm(LM, "smollm2-135m", seed=1)
    projection = KeyProjection(torch.zeros(1280), torch.randn(1280, 4))
    store = CaptionDatastore.of_images(torch.randn(3, 1280), [["A."], ["B."], ["C."]], ["i1", "i2", "i3"],
                                       projection=projection)
    save_captioner(tmp_path / "champion", ClipCap(cfg.mapper, 1280, lm.model), encoder=cfg.encoder.name, lm_name=LM,
                   tokenizer_name="smollm2-135m", lm_pretrained=False, retrieval=with_retrieval.retrieval,
                   datastore=store, extra={"recipe": recipe(with_retrieval)})
    log_and_register(cfg.register, "toy", tmp_path / "champion", {}, {"model_CIDEr": 0.5}, {}, [],
                     example_image="x.png", test_set="t")
    found = find_warm_start(with_retrieval)
    assert found.trained_on == frozenset({"i1", "i2", "i3"})
    assert torch.equal(found.projection.weight, projection.weight)
    assert found.describe(2, {"new": 1, "old": 3})["images"] == {"new": 1, "old": 3}


def test_replay_trains_on_every_new_image_and_a_seeded_sample_of_the_old():
    import pandas as pd

    from clipcap.pipeline.warm_start import replay_rows

    rows = pd.DataFrame({"image_id": [f"i{n}" for n in range(20)], "captions": [["c"]] * 20})
    old = frozenset(f"i{n}" for n in range(18))
    picked = replay_rows(rows, old, 3.0, seed=0)
    assert {"i18", "i19"} <= set(picked["image_id"]) and len(picked) == 2 + 6
    assert list(picked.index) == sorted(picked.index)                     # manifest order kept
    # each row keeps its label in ``rows``: the train stage finds its embedding by it (train_emb[index])
    assert picked["image_id"].tolist() == rows.loc[picked.index, "image_id"].tolist()
    assert list(picked.index[-2:]) == [18, 19]
    assert picked.equals(replay_rows(rows, old, 3.0, seed=0))             # seeded
    assert not picked.equals(replay_rows(rows, old, 3.0, seed=1))
    assert len(replay_rows(rows, old, 100.0, seed=0)) == 20               # never more than there is
    three_new = frozenset(f"i{n}" for n in range(17))
    assert len(replay_rows(rows, three_new, 0.5, seed=0)) == 3 + 2       # 1.5 old ones: rounded up
    assert replay_rows(rows, old, 0.0, seed=0) is rows                    # 0: all the old data
    assert replay_rows(rows, None, 3.0, seed=0) is rows                   # the champion's images unknown
    assert replay_rows(rows, frozenset(rows["image_id"]), 3.0, seed=0) is rows   # nothing new to train on


def test_a_warm_starts_warmup_is_a_tenth_of_its_steps():
    from clipcap.pipeline.stages.train import warm_start_warmup

    cfg = dataclasses.replace(Config(), retrain=RetrainConfig(epochs=2))   # batch 16, train.warmup_steps 40
    assert warm_start_warmup(cfg, 312) == 4          # 20 steps an epoch x 2 = 40 steps
    assert warm_start_warmup(cfg, 16 * 1000) == 40   # at most train.warmup_steps
    assert warm_start_warmup(cfg, 3) == 1
    accumulating = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=2, warmup_steps=7))
    assert warm_start_warmup(accumulating, 312) == 2      # 20 micro-batches an epoch: 10 steps x 2 = 20 steps
    assert warm_start_warmup(accumulating, 16 * 1000) == 7   # at most this train.warmup_steps


def test_a_warm_started_run_pairs_each_replayed_caption_with_its_own_images_embedding(cfg, monkeypatch):
    """The train stage trains a warm start on the new images and a sample of the old (``replay_rows``),
    finding their embeddings by row label: every caption it trains on must come with its own image's
    embedding, the new images' (at the end of the split) and the replayed old ones'."""
    import pandas as pd

    import clipcap.pipeline.stages.train as stage
    from clipcap.pipeline.warm_start import WarmStart

    cfg = dataclasses.replace(cfg, retrain=RetrainConfig(replay=1.0))
    rows = pd.DataFrame({"image_id": [f"i{n}" for n in range(20)],
                         "captions": [[f"Picture {n}, caption {c}." for c in range(2)] for n in range(20)]})
    embeddings = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))  # one distinct vector per image
    val = pd.DataFrame({"image_id": [], "captions": []})
    monkeypatch.setattr(stage, "split_data", lambda *args: [(rows, embeddings), (val, torch.empty(0, 8))])
    lm = load_lm(cfg.lm.name, cfg.lm.tokenizer, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    weights = ClipCap(cfg.mapper, 8, lm.model).weights()
    old = frozenset(f"i{n}" for n in range(16))  # 4 new images, 4 old ones replayed
    monkeypatch.setattr(stage, "find_warm_start", lambda c: WarmStart("models:/clipcap-toy/1", "same recipe",
                                                                      weights, old))
    seen = []

    class Trained(Exception):
        pass

    def train_model(model, pairs, *args, **kwargs):
        seen.append(pairs)
        raise Trained

    monkeypatch.setattr(stage, "train_model", train_model)
    with pytest.raises(Trained):
        stage.run(cfg, tracking=False)
    [pairs] = seen
    trained = {}
    for image, tokens in zip(pairs.image_index, pairs.token_ids):
        caption = lm.tokenizer.decode(tokens, skip_special_tokens=True)
        number = int(caption.removeprefix("Picture ").split(",")[0])
        assert torch.equal(pairs.embeddings[image], embeddings[number]), caption  # its own image's vector
        trained.setdefault(f"i{number}", []).append(caption)
    assert {"i16", "i17", "i18", "i19"} <= trained.keys() and len(trained) == 8
    assert all(len(captions) == 2 for captions in trained.values())

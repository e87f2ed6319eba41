"""Test captions made ahead in parts: kept under a key of the captioner and the settings, taken by the
evaluate stage only for that key, the rest captioned there, in the test split's order."""

from __future__ import annotations

import json

import torch

from clipcap.config import config_from_dict, config_to_dict
from clipcap.pipeline.caption_parts import CaptionParts, captions_key
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.stages import evaluate


def _model(folder, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"format": "clipcap-captioner/1", "files": files}))


def test_the_key_changes_with_the_captioner_and_the_settings(tmp_path):
    _model(tmp_path / "a", {"model.safetensors": "aaa"})
    _model(tmp_path / "b", {"model.safetensors": "bbb"})
    settings = {"decoding": {"num_beams": 3}, "batch_size": 8}
    key = captions_key(tmp_path / "a", settings)
    assert key == captions_key(tmp_path / "a", dict(reversed(settings.items())))   # order of keys: no matter
    assert key != captions_key(tmp_path / "b", settings)                           # another captioner
    assert key != captions_key(tmp_path / "a", {"decoding": {"num_beams": 4}, "batch_size": 8})


def test_parts_are_read_back_whole_and_consumed(tmp_path):
    parts = CaptionParts(tmp_path / "caption-parts", "k1")
    parts.write("part1of2", {"x": "A cat.", "y": "Ünïcode \"quoted\"."})
    parts.write("part2of2", {"z": "A dog."})
    CaptionParts(tmp_path / "caption-parts", "old").write("part1of1", {"x": "stale"})
    assert parts.read() == {"x": "A cat.", "y": "Ünïcode \"quoted\".", "z": "A dog."}
    assert CaptionParts(tmp_path / "caption-parts", "none").read() == {}
    parts.consume()
    assert not (tmp_path / "caption-parts").exists()


def test_the_stage_takes_the_parts_captions_and_makes_only_the_rest(tmp_path, monkeypatch):
    cfg = config_from_dict({"dataset": {"name": "d"}})
    layout = Layout(tmp_path)
    _model(layout.model, {"model.safetensors": "aaa"})
    key = captions_key(layout.model, config_to_dict(cfg.evaluate))
    CaptionParts(layout.caption_parts, key).write("part1of2", {"b": "made by part 1"})
    CaptionParts(layout.caption_parts, "another-model").write("part2of2", {"c": "not for this model"})
    made_here = []

    def caption(captioner, embeddings, settings):
        made_here.append(embeddings[:, 0].tolist())
        return [f"made here from {v:.0f}" for v in embeddings[:, 0].tolist()]

    monkeypatch.setattr(evaluate, "caption_test_split", caption)
    embeddings = torch.tensor([[0.0], [1.0], [2.0]])
    captions = evaluate.caption_missing(None, ["a", "b", "c"], embeddings, cfg, layout)
    assert captions == ["made here from 0", "made by part 1", "made here from 2"]
    assert made_here == [[0.0, 2.0]]                         # only the images no part captioned, in order
    assert not layout.caption_parts.exists()                 # consumed

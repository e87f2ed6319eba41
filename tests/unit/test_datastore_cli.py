"""A retrieval-augmented captioner on disk: saved with its datastore, reloaded, captioning with the
retrieved captions in its prompt, and extended with new captioned images without retraining."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipcap.cli import main
from clipcap.config import MapperConfig, RetrievalConfig
from clipcap.modeling.captioner import Captioner, save_captioner
from clipcap.modeling.lms import load_lm
from clipcap.modeling.model import ClipCap
from clipcap.modeling.retrieval import CaptionDatastore

LM = "tiny-gpt2:n_layer=1,n_embd=32"


def noise(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def captioner_dir(tmp_path):
    lm = load_lm(LM, "smollm2-135m", seed=1)
    torch.manual_seed(0)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 1280, lm.model)
    store = CaptionDatastore.build(torch.randn(3, 1280, generator=torch.Generator().manual_seed(0)),
                                   ["A red kite.", "A blue boat.", "A green tree."], ["k", "b", "t"])
    return save_captioner(tmp_path / "m", model, encoder="efficientnet-lite0:random", lm_name=LM,
                          tokenizer_name="smollm2-135m", lm_pretrained=False,
                          retrieval=RetrievalConfig(k=2), datastore=store)


def test_a_retrieving_captioner_round_trips_with_its_datastore(captioner_dir, tmp_path):
    captioner = Captioner.load(captioner_dir)
    assert captioner.retriever is not None and captioner.retriever.k == 2
    assert len(captioner.retriever.datastore) == 3
    image = noise(tmp_path / "x.png", 1)
    embedding = captioner.embed([image])
    retrieved = captioner.retriever.captions(embedding)[0]
    assert len(retrieved) == 2 and set(retrieved) <= {"A red kite.", "A blue boat.", "A green tree."}
    from clipcap.modeling.decode import GREEDY, generate_captions

    prompts = captioner.retriever.prompts_of(captioner.tokenizer, [retrieved])
    with_prompt = generate_captions(captioner.model, captioner.tokenizer, embedding, GREEDY, prompts=prompts)[0][0]
    without = generate_captions(captioner.model, captioner.tokenizer, embedding, GREEDY)[0][0]
    assert with_prompt != without  # the retrieved captions change this model's caption: the check below means something
    assert captioner.caption([image], GREEDY) == [with_prompt]  # it captions with its retrieved captions in the prompt


def test_datastore_add_makes_new_images_retrievable(captioner_dir, tmp_path, capsys):
    folder = tmp_path / "new"
    rows = [{"image": "owl.png", "caption": "An owl on a branch."}, {"image": "fox.png", "caption": "A sleeping fox."},
            {"image": "gone.png", "caption": "A missing picture."}]
    noise(folder / "owl.png", 2), noise(folder / "fox.png", 3)
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert main(["datastore", "add", str(folder), "--model", str(captioner_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 captions added" in out and "missing_file" in out and "holds 5" in out

    captioner = Captioner.load(captioner_dir)
    owl = captioner.embed([folder / "owl.png"])
    assert captioner.retriever.captions(owl)[0][0] == "An owl on a branch."   # its own caption is now nearest
    assert main(["datastore", "add", str(folder), "--model", str(captioner_dir)]) == 0
    assert "0 captions added (2 already there" in capsys.readouterr().out


def test_datastore_add_refuses_a_captioner_without_retrieval(tmp_path, capsys):
    lm = load_lm(LM, "smollm2-135m", seed=1)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 1280, lm.model)
    plain = save_captioner(tmp_path / "plain", model, encoder="efficientnet-lite0:random", lm_name=LM,
                           tokenizer_name="smollm2-135m", lm_pretrained=False)
    noise(tmp_path / "f" / "a.png", 0)
    (tmp_path / "f" / "captions.jsonl").write_text('{"image": "a.png", "caption": "A thing."}\n')
    assert main(["datastore", "add", str(tmp_path / "f"), "--model", str(plain)]) == 1
    assert "retrieval.k: 0" in capsys.readouterr().err


def test_rerank_keeps_the_likeliest_retrieved_caption_unless_the_best_beam_beats_it_by_the_margin(
        captioner_dir, tmp_path):
    from clipcap.config import DecodingConfig
    from clipcap.modeling.decode import caption_nll

    captioner = Captioner.load(captioner_dir)
    embeddings = captioner.embed([noise(tmp_path / f"{i}.png", i) for i in range(3)])
    beams = captioner.caption_embeddings(embeddings, DecodingConfig(num_beams=3, num_captions=3, max_new_tokens=5))
    retrieved = captioner.retriever.captions(embeddings)
    prompts = captioner.retriever.prompts(captioner.tokenizer, embeddings)
    gaps = []
    for i in range(len(embeddings)):
        candidates = list(dict.fromkeys(c for c in [beams[i][0], *retrieved[i]] if c))  # beam search ranked the rest
        nll = caption_nll(captioner.model, captioner.tokenizer, embeddings[i : i + 1], candidates,
                          owner=[0] * len(candidates), prompts=[prompts[i]]).tolist()
        scores = dict(zip(candidates, nll))
        kept = min(retrieved[i], key=scores.get)
        gaps.append((beams[i][0], kept, scores[kept] - scores.get(beams[i][0], float("inf"))))
    assert any(beam != kept and gap > 0 for beam, kept, gap in gaps), \
        "no image where the beam is likelier: the test would not tell the rules apart"
    for margin in (0.0, max(gap for *_, gap in gaps) / 2, 1e9):
        decoding = DecodingConfig(num_beams=3, max_new_tokens=5, rerank_margin=margin)
        chosen = captioner.caption_embeddings(embeddings, decoding)
        assert [c for (c,) in chosen] == [beam if beam != kept and gap > margin else kept for beam, kept, gap in gaps]


def test_rerank_margin_must_not_be_negative():
    from clipcap.config import ConfigError, DecodingConfig

    with pytest.raises(ConfigError, match="rerank_margin"):
        DecodingConfig(rerank_margin=-0.1)

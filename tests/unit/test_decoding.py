"""Decoding strategies through generate(inputs_embeds): beams, nucleus sampling, n-gram blocking."""

import pytest
import torch

from clipcap.config import ConfigError, DecodingConfig
from clipcap.modeling.decode import generate_token_ids
from helpers import EOS, PAD, scramble_lm, tiny_clipcap


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded inputs: a test's preconditions must not depend on which tests ran before it."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return scramble_lm(tiny_clipcap("mlp").eval())


def _generate(model, embeddings, **options):
    return generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD,
                              decoding=DecodingConfig(max_new_tokens=10, **options))


def test_several_beam_captions_per_image_best_first(model):
    embeddings = randn(3, 16) * 3
    out = _generate(model, embeddings, strategy="beam", num_beams=4, num_captions=3)
    assert out.shape[0] == 9  # image i owns rows 3i..3i+2
    best = _generate(model, embeddings, strategy="beam", num_beams=4)
    assert best.shape[0] == 3
    for image in range(3):
        rows = {tuple(r) for r in out[3 * image : 3 * image + 3].tolist()}
        assert len(rows) == 3  # distinct hypotheses
        assert out[3 * image].tolist()[: best.shape[1]] == best[image].tolist()


def test_nucleus_sampling_is_seeded_and_varies(model):
    embeddings = randn(2, 16) * 3
    torch.manual_seed(0)
    first = _generate(model, embeddings, strategy="sample", top_p=0.95, temperature=1.5, num_captions=4)
    torch.manual_seed(0)
    again = _generate(model, embeddings, strategy="sample", top_p=0.95, temperature=1.5, num_captions=4)
    assert first.shape[0] == 8 and torch.equal(first, again)
    assert len({tuple(r) for r in first[:4].tolist()}) > 1  # samples differ
    torch.manual_seed(1)
    other = _generate(model, embeddings, strategy="sample", top_p=0.95, temperature=1.5, num_captions=4)
    assert not torch.equal(other, first)  # the seed is what they depend on


def test_tiny_top_p_is_greedy(model):
    embeddings = randn(4, 16) * 3
    greedy = _generate(model, embeddings, strategy="greedy")
    nucleus = _generate(model, embeddings, strategy="sample", top_p=1e-6)
    assert torch.equal(greedy, nucleus)


def test_no_repeat_ngram_blocks_repeats(model):
    embeddings = randn(6, 16) * 3
    plain = _generate(model, embeddings, strategy="greedy")
    assert any(len(set(row)) < len(row) for row in plain.tolist()), "the random LM should repeat itself"
    blocked = _generate(model, embeddings, strategy="greedy", no_repeat_ngram_size=1)
    for row in blocked.tolist():
        tokens = [t for t in row if t not in (PAD, EOS)]
        assert len(tokens) == len(set(tokens))


def eos_competes(model, weight: float = 0.3):
    """EOS a strong candidate at every step (``weight``: how strong): finished beams compete with longer ones."""
    direction = randn(model.lm.config.n_embd)
    with torch.no_grad():
        model.lm.transformer.ln_f.bias.copy_(direction)
        model.lm.lm_head.weight[EOS] = direction / direction.norm() * weight
    return model


def test_length_penalty_changes_what_beam_search_prefers():
    model = eos_competes(scramble_lm(tiny_clipcap("mlp").eval()))
    embeddings = randn(8, 16) * 3
    lengths = {}
    for penalty in (-3.0, 3.0):
        out = _generate(model, embeddings, strategy="beam", num_beams=4, length_penalty=penalty)
        lengths[penalty] = sum(int(((row != PAD) & (row != EOS)).sum()) for row in out)
    assert lengths[-3.0] < lengths[3.0]


def test_beam_early_stopping_ends_the_search_once_enough_captions_have_ended():
    steps = []
    lm_calls = {True: [], False: []}
    for seed in (1, 2, 3):  # LMs where EOS competes with confident continuations
        model = eos_competes(scramble_lm(tiny_clipcap("mlp").eval(), seed=seed), weight=0.04)
        hook = model.lm.register_forward_hook(lambda *_: steps.append(1))
        for early in (True, False):
            steps.clear()
            generate_token_ids(model, randn(8, 16) * 3, eos_token_id=EOS, pad_token_id=PAD, decoding=DecodingConfig(
                strategy="beam", num_beams=4, max_new_tokens=40, early_stopping=early))
            lm_calls[early].append(len(steps))
        hook.remove()
    # False goes on while a running beam might still beat the ended ones; True stops once 4 have ended
    assert all(early <= late for early, late in zip(lm_calls[True], lm_calls[False]))
    assert sum(lm_calls[True]) < sum(lm_calls[False])


@pytest.mark.parametrize(("options", "message"), [
    ({"strategy": "beam", "num_beams": 2, "num_captions": 3}, "exceeds num_beams"),
    ({"strategy": "greedy", "num_captions": 2}, "greedy gives one"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_decoding_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        DecodingConfig(**options)

"""Shared fixtures. Offline settings are applied before anything imports transformers."""

from __future__ import annotations

import os
import tempfile

from clipcap.environment import apply_offline_env

apply_offline_env()
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="clipcap-prefect-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from clipcap.config import MapperConfig  # noqa: E402
from clipcap.model import ClipCap  # noqa: E402

TINY_VOCAB = 32
EOS, PAD = 1, 0


def tiny_lm(seed: int = 0, vocab: int = TINY_VOCAB, width: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_layer=2, n_head=2, n_embd=width, n_positions=64,
                        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def tiny_clipcap(mapper: str = "transformer", finetune_lm: bool = False, dim_embedding: int = 16,
                 prefix_length: int = 4, seed: int = 0) -> ClipCap:
    cfg = MapperConfig(type=mapper, prefix_length=prefix_length, clip_length=3, num_layers=1, num_heads=2,
                       mlp_ratio=2.0, normalize_embedding=True)
    lm = tiny_lm(seed)
    torch.manual_seed(seed)
    return ClipCap(cfg, dim_embedding, lm, finetune_lm=finetune_lm)


def scramble_lm(model: ClipCap, seed: int = 1) -> ClipCap:
    """Large random LM weights, so that (greedy) output depends strongly on the image."""
    torch.manual_seed(seed)
    for weight in model.lm.transformer.h.parameters():
        torch.nn.init.normal_(weight, std=0.5)
    return model


def assert_batched_greedy_equals_sequential(model: ClipCap, embeddings: torch.Tensor,
                                            max_new_tokens: int = 8) -> torch.Tensor:
    """Greedy on the whole batch gives, token for token, what one image at a time gives."""
    from clipcap.config import DecodingConfig
    from clipcap.decode import generate_token_ids

    greedy = DecodingConfig(strategy="greedy", max_new_tokens=max_new_tokens)
    batched = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=greedy)
    for row in range(embeddings.shape[0]):
        single = generate_token_ids(model, embeddings[row : row + 1], eos_token_id=EOS, pad_token_id=PAD,
                                    decoding=greedy)[0].tolist()
        assert batched[row].tolist()[: len(single)] == single
        assert set(batched[row].tolist()[len(single) :]) <= {PAD, EOS}  # finished rows are only padded
    return batched


@pytest.fixture
def make_image(tmp_path):
    """Write a small real PNG and return its path."""

    def make(name: str, color=(200, 30, 30), size=(32, 24), mode="RGB"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color).save(path)
        return path

    return make

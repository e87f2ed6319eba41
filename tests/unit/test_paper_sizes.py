"""Trainable parameter counts of the paper's two configurations (GPT-2 small, K=10, CLIP ViT-B/32 e=512)."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.config import MapperConfig
from clipcap.model import ClipCap


@pytest.mark.parametrize(
    ("mapper", "finetune", "low", "high"),
    [("transformer", False, 40e6, 45e6), ("mlp", True, 150e6, 160e6)],  # paper: ~43 M and ~156 M
)
def test_trainable_parameters_match_the_paper(mapper, finetune, low, high):
    lm = GPT2LMHeadModel(GPT2Config())  # GPT-2 small architecture, random weights
    model = ClipCap(MapperConfig(type=mapper, prefix_length=10, clip_length=10), 512, lm, finetune_lm=finetune)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert low < trainable < high, f"{trainable:,}"

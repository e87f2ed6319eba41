"""Trainable parameter counts of the paper's configurations and its two ablation mixes
(GPT-2 small, K = clip_length = 10, CLIP ViT-B/32 e = 512)."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.config import MapperConfig
from clipcap.modeling.model import ClipCap

GPT2_SMALL = 124_439_808  # its parameters (tied embeddings counted once)


@pytest.fixture(scope="module")
def gpt2_small():
    return GPT2LMHeadModel(GPT2Config())  # the architecture, random weights


@pytest.mark.parametrize(
    ("mapper", "finetune", "expected"),
    [
        ("transformer", False, 41_765_376),  # paper: ~43 M (the transformer configuration)
        ("mlp", True, 155_908_608),          # paper: ~156 M (the mlp configuration)
        ("transformer", True, 41_765_376 + GPT2_SMALL),  # ablation: transformer + LM tuning
        ("mlp", False, 155_908_608 - GPT2_SMALL),        # ablation: mlp + frozen LM
    ],
)
def test_trainable_parameters_match_the_paper(gpt2_small, mapper, finetune, expected):
    paper = MapperConfig(type=mapper, prefix_length=10, clip_length=10, num_layers=8)  # the default has 2 layers
    model = ClipCap(paper, 512, gpt2_small, finetune_lm=finetune)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert trainable == expected, f"{trainable:,}"
    assert sum(p.numel() for p in gpt2_small.parameters()) == GPT2_SMALL
    assert f"{trainable:,} trainable" in model.parameter_summary()
    assert ("fine-tuned" if finetune else "frozen") in model.parameter_summary()

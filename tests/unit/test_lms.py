"""Any transformers causal LM: d is read from the LM, training and batched decoding work alike."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from clipcap.captions import PadCollator
from clipcap.config import DecodingConfig, MapperConfig
from clipcap.decode import generate_token_ids
from clipcap.model import ClipCap
from conftest import EOS, PAD, TINY_VOCAB

SPECIAL = {"vocab_size": TINY_VOCAB, "eos_token_id": EOS, "bos_token_id": EOS, "pad_token_id": PAD}


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=48, n_positions=64, **SPECIAL))


def llama():  # the SmolLM2 family: RoPE, RMSNorm, grouped-query attention
    return LlamaForCausalLM(LlamaConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **SPECIAL))


def opt():  # like opt-350m: token embeddings narrower than the hidden size, projected in and out
    return OPTForCausalLM(OPTConfig(hidden_size=48, word_embed_proj_dim=24, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, **SPECIAL))


@pytest.mark.parametrize(("build", "width"), [(gpt2, 48), (llama, 40), (opt, 24)])
@pytest.mark.parametrize("mapper", ["transformer", "mlp"])
def test_any_causal_lm(build, width, mapper):
    torch.manual_seed(0)
    lm = build()
    model = ClipCap(MapperConfig(type=mapper, prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 16, lm)
    assert model.prefix(torch.randn(2, 16)).shape == (2, 3, width)  # d = the LM's input-embedding width

    batch = PadCollator(PAD)([(torch.randn(16), [5, 6, 7, EOS]), (torch.randn(16), [8, EOS])])
    model.train()
    loss = model(batch.embedding, batch.input_ids, batch.attention_mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.mapper.parameters() if p.requires_grad)
    assert all(p.grad is None for p in lm.parameters())

    embeddings = torch.randn(4, 16) * 3
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=6)
    batched = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=greedy)
    for row in range(4):
        single = generate_token_ids(model, embeddings[row : row + 1], eos_token_id=EOS, pad_token_id=PAD,
                                    decoding=greedy)[0].tolist()
        assert batched[row].tolist()[: len(single)] == single
    beams = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD,
                               decoding=DecodingConfig(num_beams=3, num_captions=2, max_new_tokens=6))
    assert beams.shape[0] == 8

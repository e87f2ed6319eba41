"""Any transformers causal LM: d is read from the LM, training and batched decoding work alike."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from clipcap.training.batches import PadCollator
from clipcap.config import DecodingConfig, MapperConfig
from clipcap.modeling.decode import generate_token_ids
from clipcap.modeling.model import ClipCap
from helpers import EOS, PAD, TINY_VOCAB, assert_batched_greedy_equals_sequential, scramble_lm

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

    # the head on caption positions only == full-vocabulary logits everywhere with -100 on prefix and padding
    model.eval()
    prefix = model.prefix(batch.embedding)
    inputs = torch.cat([prefix, lm.get_input_embeddings()(batch.input_ids)], dim=1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), batch.attention_mask], dim=1)
    logits = lm(inputs_embeds=inputs, attention_mask=mask).logits[:, :-1]
    labels = torch.cat([torch.full((2, 3), -100), batch.input_ids.masked_fill(batch.attention_mask == 0, -100)], 1)
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(batch.embedding, batch.input_ids, batch.attention_mask), reference)

    embeddings = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)) * 3
    assert_batched_greedy_equals_sequential(scramble_lm(model, mapper=True), embeddings, max_new_tokens=6)
    beams = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD,
                               decoding=DecodingConfig(num_beams=3, num_captions=2, max_new_tokens=6))
    assert beams.shape[0] == 8

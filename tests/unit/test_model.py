import pytest
import torch
import torch.nn.functional as F

from clipcap.training.batches import CaptionPairs, PadCollator
from clipcap.config import DecodingConfig, TrainConfig
from clipcap.modeling.decode import generate_token_ids
from clipcap.modeling.model import ClipCap
from clipcap.training.loop import train_model
from helpers import EOS, PAD, assert_batched_greedy_equals_sequential, scramble_lm, tiny_clipcap


@pytest.mark.parametrize("mapper", ["transformer", "mlp"])
def test_prefix_shape_reads_width_from_lm(mapper):
    model = tiny_clipcap(mapper)
    prefix = model.prefix(torch.randn(3, 16))
    assert prefix.shape == (3, 4, model.lm.config.n_embd)


@pytest.mark.parametrize("mapper", ["transformer", "mlp"])
def test_mapper_dropout_acts_in_training_only(mapper):
    model = tiny_clipcap(mapper, dropout=0.5)
    embedding = torch.randn(3, 16)
    model.train()
    torch.manual_seed(0)
    first = model.prefix(embedding)
    torch.manual_seed(1)
    assert not torch.allclose(first, model.prefix(embedding))          # a different mask, another prefix
    model.eval()
    plain = tiny_clipcap(mapper)                                        # same weights and names, no dropout
    assert model.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(model.prefix(embedding), plain.eval().prefix(embedding))


def test_mapper_dropout_and_noise_are_checked_at_load():
    from clipcap.config import ConfigError, MapperConfig

    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        MapperConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="embedding_noise"):
        MapperConfig(embedding_noise=-0.1)


def test_embedding_noise_perturbs_the_direction_in_training_only():
    model = tiny_clipcap()
    noisy = tiny_clipcap(embedding_noise=0.5)                          # the same weights
    embedding = torch.randn(256, 16)
    unit = ClipCap.perturb(embedding, 0.0)
    torch.testing.assert_close(unit, embedding)                        # no noise: the embedding itself
    torch.manual_seed(0)
    moved = ClipCap.perturb(embedding, 0.5)
    torch.testing.assert_close(moved.norm(dim=-1), embedding.norm(dim=-1))  # the norm is kept
    cosine = F.cosine_similarity(moved, embedding).mean()
    assert 0.8 < cosine < 0.95                                         # ~1/sqrt(1 + 0.5^2) = 0.89
    noisy.train()
    assert not torch.allclose(noisy.prefix(embedding[:3]), model.eval().prefix(embedding[:3]))
    noisy.eval()                                                       # at inference: the image as it is
    torch.testing.assert_close(noisy.prefix(embedding[:3]), model.prefix(embedding[:3]))


def test_loss_ignores_padding_and_prefix():
    """The padded batch loss equals the token-weighted mean of the unpadded per-caption losses."""
    model = tiny_clipcap().eval()
    embedding = torch.randn(2, 16)
    captions = [[5, 6, 7, 8, EOS], [9, 10, EOS]]
    batch = PadCollator(PAD)([(embedding[0], captions[0]), (embedding[1], captions[1])])
    assert batch.input_ids[1].tolist() == [9, 10, EOS, PAD, PAD]
    padded = model(batch.embedding, batch.input_ids, batch.attention_mask)
    singles = [model(embedding[i : i + 1], torch.tensor([c]), torch.ones(1, len(c), dtype=torch.long))
               for i, c in enumerate(captions)]
    expected = (singles[0] * 5 + singles[1] * 3) / 8
    torch.testing.assert_close(padded, expected)


def test_padding_to_a_multiple_changes_no_loss():
    """Compiled training pads captions to multiples of 8 (static shapes): the batch loss and each
    caption's own loss are those of the shortest padding."""
    model = tiny_clipcap().eval()
    items = [(torch.randn(16), [5, 6, 7, 8, EOS]), (torch.randn(16), [9, 10, EOS])]
    tight, rounded = PadCollator(PAD)(items), PadCollator(PAD, multiple=8)(items)
    assert rounded.input_ids.shape == (2, 8) and rounded.attention_mask.sum(1).tolist() == [5, 3]
    for per_caption in (False, True):
        torch.testing.assert_close(model(**rounded.model_inputs(), per_caption=per_caption),
                                   model(**tight.model_inputs(), per_caption=per_caption))


def test_loss_scores_caption_tokens_only():
    """Same value as full-vocabulary logits over every position with -100 on prefix and padding."""
    model = tiny_clipcap().eval()
    embedding = torch.randn(2, 16)
    batch = PadCollator(PAD)([(embedding[0], [5, 6, EOS]), (embedding[1], [7, EOS])])
    prefix = model.prefix(batch.embedding)
    inputs = torch.cat([prefix, model.lm.get_input_embeddings()(batch.input_ids)], dim=1)
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), batch.attention_mask], dim=1)
    logits = model.lm(inputs_embeds=inputs, attention_mask=mask).logits
    labels = torch.cat([torch.full((2, 4), -100), batch.input_ids.masked_fill(batch.attention_mask == 0, -100)], 1)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100)
    torch.testing.assert_close(model(batch.embedding, batch.input_ids, batch.attention_mask), reference)


def test_frozen_lm_gets_no_gradients():
    model = tiny_clipcap("transformer", finetune_lm=False)
    batch = PadCollator(PAD)([(torch.randn(16), [5, 6, EOS]), (torch.randn(16), [7, EOS])])
    model.train()
    model(batch.embedding, batch.input_ids, batch.attention_mask).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.mapper.parameters())
    assert not model.lm.training  # a frozen LM keeps dropout off in train mode
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.mapper.parameters()}


def test_finetuned_lm_gets_gradients():
    model = tiny_clipcap("mlp", finetune_lm=True)
    batch = PadCollator(PAD)([(torch.randn(16), [5, 6, EOS])])
    model(batch.embedding, batch.input_ids, batch.attention_mask).backward()
    assert model.lm.get_input_embeddings().weight.grad is not None


def test_overfit_model_learns_eos_and_generation_stops_there():
    torch.manual_seed(0)
    embeddings = torch.randn(2, 16)
    captions = [[5, 6, 7, EOS], [8, 9, EOS]]
    pairs = CaptionPairs(embeddings, [0, 1], captions)
    model = tiny_clipcap("mlp", finetune_lm=True)
    cfg = TrainConfig(seed=0, epochs=150, batch_size=2, lr=3e-3, warmup_steps=5, weight_decay=0.0, device="cpu")
    history = train_model(model, pairs, None, cfg, pad_token_id=PAD)
    assert history.steps[-1]["loss"] < 0.1 < 1.0 < history.steps[0]["loss"]
    for beams in (1, 3):
        # the whole beam search (early_stopping off): with a vocabulary this small, unlikely endings fill the
        # 3 beams' finished list within 3 steps, and early stopping would return [5, 6, EOS] (test_decoding)
        decoding = DecodingConfig(strategy="beam" if beams > 1 else "greedy", num_beams=beams, max_new_tokens=12,
                                  early_stopping=False)
        out = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=decoding)
        assert out.shape[1] < 12, "generation should stop once every caption emitted EOS"
        assert out[0].tolist()[:4] == [5, 6, 7, EOS]
        assert out[1].tolist()[:3] == [8, 9, EOS]
        assert set(out[1].tolist()[3:]) <= {PAD, EOS}, out.tolist()  # nothing generated after EOS


def test_length_grouped_batches_cover_every_caption_once_per_epoch():
    from clipcap.training.batches import LengthGroupedBatches

    lengths = [3, 9, 4, 12, 5, 5, 8, 2, 7, 11, 6]
    sampler = LengthGroupedBatches(lengths, batch_size=3, seed=0, group_batches=2)
    first = list(sampler)
    assert first == list(sampler)  # the order is a function of (seed, epoch)
    assert first != list(LengthGroupedBatches(lengths, batch_size=3, seed=1, group_batches=2))  # another seed
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(sampler) == 4
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))
    assert first != second  # reshuffled each epoch
    for batch in first:  # within a group, batches hold neighbouring lengths
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)


def test_batched_greedy_equals_one_image_at_a_time():
    model = scramble_lm(tiny_clipcap("mlp").eval())
    batched = assert_batched_greedy_equals_sequential(model, torch.randn(5, 16) * 3)
    assert len({tuple(row) for row in batched.tolist()}) > 1, "captions should differ between images"

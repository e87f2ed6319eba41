"""Tiny models for the unit tests, built from config in milliseconds."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.config import DecodingConfig, MapperConfig
from clipcap.modeling.decode import generate_token_ids
from clipcap.modeling.model import ClipCap

TINY_VOCAB = 32
EOS, PAD = 1, 0


def tiny_lm(seed: int = 0, vocab: int = TINY_VOCAB, width: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_layer=2, n_head=2, n_embd=width, n_positions=64,
                        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def tiny_clipcap(mapper: str = "transformer", finetune_lm: bool = False, dim_embedding: int = 16,
                 prefix_length: int = 4, seed: int = 0, dropout: float = 0.0,
                 embedding_noise: float = 0.0) -> ClipCap:
    cfg = MapperConfig(type=mapper, prefix_length=prefix_length, clip_length=3, num_layers=1, num_heads=2,
                       mlp_ratio=2.0, normalize_embedding=True, dropout=dropout,
                       embedding_noise=embedding_noise)
    lm = tiny_lm(seed)
    torch.manual_seed(seed)
    return ClipCap(cfg, dim_embedding, lm, finetune_lm=finetune_lm)


def scramble_lm(model: ClipCap, seed: int = 1, mapper: bool = False) -> ClipCap:
    """Large random weights in the LM's blocks (any architecture: every matrix but the token
    embeddings), so that its greedy output depends strongly on the image prefix; with ``mapper``
    the mapper's matrices too (a freshly built transformer mapper barely depends on the image)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = model.lm.get_input_embeddings().weight
    modules = [model.lm, model.mapper] if mapper else [model.lm]
    with torch.no_grad():
        for module in modules:
            for weight in module.parameters():
                if weight.ndim >= 2 and weight is not embeddings:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    return model


def assert_batched_greedy_equals_sequential(model: ClipCap, embeddings: torch.Tensor,
                                            max_new_tokens: int = 8) -> torch.Tensor:
    """Greedy on the whole batch gives, token for token, what one image at a time gives."""
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=max_new_tokens)
    batched = generate_token_ids(model, embeddings, eos_token_id=EOS, pad_token_id=PAD, decoding=greedy)
    for row in range(embeddings.shape[0]):
        single = generate_token_ids(model, embeddings[row : row + 1], eos_token_id=EOS, pad_token_id=PAD,
                                    decoding=greedy)[0].tolist()
        assert batched[row].tolist()[: len(single)] == single
        assert set(batched[row].tolist()[len(single) :]) <= {PAD, EOS}  # finished rows are only padded
    # the comparison means something only when the images get different captions
    assert len({tuple(r) for r in batched.tolist()}) > 1, "every image got the same caption: the check is vacuous"
    return batched


def decompression_bomb_png(side: int = 60_000) -> bytes:
    """A PNG whose header claims side x side pixels, in a few hundred bytes: past Pillow's own bomb limit."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
            + chunk(b"IEND", b""))

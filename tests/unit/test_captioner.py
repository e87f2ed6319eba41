import torch

from clipcap.modeling.captioner import load_captioner_model, save_captioner
from clipcap.config import MapperConfig
from clipcap.modeling.lms import load_lm
from clipcap.modeling.model import ClipCap


def _model(finetune: bool) -> tuple[ClipCap, object]:
    lm = load_lm("tiny-gpt2:n_layer=1,n_embd=32", "smollm2-135m", seed=1)
    cfg = MapperConfig(type="transformer", prefix_length=3, clip_length=2, num_layers=1, num_heads=2)
    model = ClipCap(cfg, 8, lm.model, finetune_lm=finetune)
    model.fit_embedding_mean(torch.randn(20, 8) + 3.0)
    return model, lm


def test_saved_captioner_reloads_to_the_same_prefix_and_tokens(tmp_path):
    model, lm = _model(finetune=False)
    save_captioner(tmp_path / "m", model, encoder="efficientnet-lite0", lm_name="tiny-gpt2:n_layer=1,n_embd=32",
                   tokenizer_name="smollm2-135m", lm_pretrained=lm.pretrained)
    loaded, tokenizer, config = load_captioner_model(tmp_path / "m")
    embedding = torch.randn(4, 8)
    torch.testing.assert_close(loaded.prefix(embedding), model.eval().prefix(embedding))
    torch.testing.assert_close(loaded.embedding_mean, model.embedding_mean)
    assert config["lm"]["weights_saved"] is True  # a random tiny LM cannot be rebuilt from its name
    assert tokenizer.eos_token_id is not None
    assert not any(p.requires_grad for p in loaded.lm.parameters())


def test_prefix_is_computed_from_the_centered_embedding():
    model, _ = _model(finetune=False)
    model.eval()
    common, images = model.embedding_mean.clone(), torch.randn(2, 8)
    centered = model.prefix(images + common)
    model.embedding_mean.zero_()
    torch.testing.assert_close(centered, model.prefix(images))

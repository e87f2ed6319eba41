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


def _saved(tmp_path, lm_pretrained=None) -> "Path":
    model, lm = _model(finetune=False)
    return save_captioner(tmp_path / "m", model, encoder="efficientnet-lite0:random",
                          lm_name="tiny-gpt2:n_layer=1,n_embd=32", tokenizer_name="smollm2-135m",
                          lm_pretrained=lm.pretrained if lm_pretrained is None else lm_pretrained)


def test_a_truncated_weights_file_is_an_error_naming_it(tmp_path):
    import pytest

    from clipcap.errors import ClipcapError

    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ClipcapError, match="model.safetensors: does not match the sha256"):
        load_captioner_model(folder)
    config = folder / "config.json"  # a folder saved before digests were recorded: the read error names the file
    import json

    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "files"}))
    with pytest.raises(ClipcapError, match=r"model.safetensors: unreadable"):
        load_captioner_model(folder)


def test_altered_weights_of_the_same_size_are_refused(tmp_path):
    import pytest

    from clipcap.errors import ClipcapError

    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00\x00\x80\x7f" * 2  # two float32 weights become +inf
    weights.write_bytes(bytes(data))
    with pytest.raises(ClipcapError, match="damaged or altered"):
        load_captioner_model(folder)


def test_a_base_lm_that_resolves_to_other_weights_is_refused(tmp_path):
    """Saved as if the LM could be rebuilt from its name: here its name gives other weights (seed 0, not 1)."""
    import pytest

    from clipcap.errors import ClipcapError

    folder = _saved(tmp_path, lm_pretrained=True)
    with pytest.raises(ClipcapError, match="base LM 'tiny-gpt2:n_layer=1,n_embd=32' resolves here to other weights"):
        load_captioner_model(folder)


def test_an_encoder_that_resolves_to_other_weights_is_refused(tmp_path):
    import json

    import pytest

    from clipcap.errors import ClipcapError
    from clipcap.modeling.captioner import Captioner

    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["encoder_key"] == "efficientnet-lite0@random"
    config["encoder_key"] = "efficientnet-lite0@0123456789ab"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipcapError, match="trained with efficientnet-lite0@0123456789ab"):
        Captioner.load(folder).encoder

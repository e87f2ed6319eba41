import pytest
import torch
from PIL import Image

from clipcap.modeling.encoders import EncoderSpecError, build_encoder, encoder_key


@pytest.mark.parametrize(("model", "dim"), [("ViT-B-32", 512), ("RN50", 1024)])
def test_open_clip_tower_by_name_reads_its_embedding_size(model, dim):
    encoder = build_encoder(f"open_clip:{model}")  # no pretrained tag: random weights, offline
    pixels = encoder.preprocess(Image.new("RGB", (300, 200), (10, 200, 30))).unsqueeze(0)
    assert encoder.dim == dim
    assert encoder(pixels).shape == (1, dim)
    assert encoder.key == encoder_key(f"open_clip:{model}") == f"open_clip:{model}@random"
    assert not any(p.requires_grad for p in encoder.parameters())


def test_efficientnet_key_names_its_weights(tmp_path):
    real, random = encoder_key("efficientnet-lite0"), encoder_key("efficientnet-lite0:random")
    assert real.startswith("efficientnet-lite0@") and real != random
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"weights v1")
    first = encoder_key(f"open_clip:ViT-B-32:{checkpoint}")
    checkpoint.write_bytes(b"weights v2")
    assert encoder_key(f"open_clip:ViT-B-32:{checkpoint}") != first  # new weights, new store


@pytest.mark.parametrize("spec", ["resnet50", "efficientnet-lite0:laion", "open_clip:"])
def test_unknown_encoder_names_the_key(spec):
    with pytest.raises(EncoderSpecError, match="encoder.name"):
        encoder_key(spec)


def test_efficientnet_features_tell_images_apart(make_image):
    encoder = build_encoder("efficientnet-lite0")
    red = encoder.preprocess(Image.new("RGB", (64, 64), (220, 20, 20)))
    blue = encoder.preprocess(Image.new("RGB", (64, 64), (20, 20, 220)))
    features = encoder(torch.stack([red, blue]))
    assert features.shape == (2, 1280)
    assert not torch.allclose(features[0], features[1], atol=1e-3)


def test_building_the_real_encoder_prints_nothing_on_stdout(capfd):
    """stdout carries captions (``clipcap caption --format jsonl``): the weights' load message goes to stderr."""
    build_encoder("efficientnet-lite0")
    out, err = capfd.readouterr()
    assert out == ""
    assert "Loaded pretrained weights" in err

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


def test_images_within_the_bounds_reach_the_encoder_unchanged():
    from clipcap.modeling.encoders import BoundShape

    bound = BoundShape(max_side=100, max_aspect_ratio=4)
    for size in ((100, 25), (25, 100), (100, 100), (7, 20)):
        image = Image.new("RGB", size, (1, 2, 3))
        assert bound(image) is image


def test_strips_and_giants_are_bounded_before_any_canvas_is_built():
    """A 3 KB 5 x 100,000 PNG once made PadToSquare build a 100,000^2 canvas (~40 GB): MemoryError."""
    from clipcap.modeling.encoders import BoundShape

    bound = BoundShape(max_side=100, max_aspect_ratio=4)
    strip = Image.new("RGB", (5, 1000), (200, 0, 0))
    out = bound(strip)
    assert out.size == (25, 100)                            # scaled to 100 long, padded to 1:4 on white
    assert out.getpixel((0, 50)) == (255, 255, 255) and out.getpixel((12, 50))[0] > 150
    assert bound(Image.new("RGB", (1000, 3), 0)).size == (100, 25)
    assert bound(Image.new("RGB", (101, 26), 0)).size == (100, 26)   # only scaled: 100 x 25.7 -> 26 is within 1:4
    assert bound(Image.new("RGB", (40, 9), 0)).size == (40, 10)       # only padded: 40 x 9 is past 1:4


@pytest.mark.parametrize("spec", ["efficientnet-lite0:random", "open_clip:ViT-B-32"])
def test_every_encoders_preprocess_bounds_a_strip_first(spec):
    from clipcap.modeling.encoders import BoundShape

    encoder = build_encoder(spec)
    assert isinstance(encoder.preprocess.transforms[0], BoundShape)
    pixels = encoder.preprocess(Image.new("RGB", (5, 100_000), (255, 255, 255)))  # 3 KB as a PNG
    assert pixels.shape[0] == 3 and pixels.shape[1] == pixels.shape[2] == 224

"""The encoder's own classifier over stored embeddings, and the "label" baseline's captions."""

import pytest
import torch
from PIL import Image
from skimage import data

from clipcap.modeling.encoders import build_encoder, encode_images
from clipcap.modeling.labels import EncoderLabels, encoder_labels, label_caption


def test_the_imagenet_head_names_real_photos_from_their_stored_embeddings():
    """The head reads the very vectors the embedding store keeps (pooled features): the cat and the
    coffee of skimage come out as the ImageNet labels EfficientNet-Lite0 gives them end to end."""
    encoder = build_encoder("efficientnet-lite0")
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    embeddings = torch.cat(list(encode_images(encoder, photos, batch_size=2)))
    cat, coffee = encoder_labels(encoder).top(embeddings, k=3)
    assert [label.name for label in cat][:1] == ["Egyptian cat"] and 0.6 < cat[0].probability < 0.95
    assert coffee[0].name == "espresso" and "cup" in [label.name for label in coffee]
    assert cat[0].probability > cat[1].probability > cat[2].probability


def test_open_clip_towers_have_no_classifier_here():
    assert encoder_labels(build_encoder("open_clip:RN50")) is None


def test_top_k_is_ordered_and_bounded():
    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
        head.bias.zero_()
    labels = EncoderLabels(["a", "b", "c"], head)
    (found,) = labels.top(torch.tensor([[0.0, 5.0, 1.0, 9.0]]), k=5)
    assert [label.name for label in found] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="3 classes for 2 names"):
        EncoderLabels(["a", "b"], head)


@pytest.mark.parametrize("label, caption", [
    ("Egyptian cat", "An Egyptian cat."), ("espresso", "An espresso."), ("moped", "A moped."),
    ("unicycle", "A unicycle."), ("hourglass", "An hourglass."), ("umbrella", "An umbrella."),
    ("military uniform", "A military uniform."),
])
def test_label_captions_take_the_right_article(label, caption):
    assert label_caption(label) == caption

"""What a served captioner accepts and refuses (clipcap.modeling.serving and the pyfunc model), in process
with a tiny captioner: base64 of any size up to the limit, no client-given paths, bounded params."""

import base64
import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from clipcap.config import ServeConfig
from helpers import decompression_bomb_png
from clipcap.modeling.serving import RequestError, check_request_size, request_decoding, request_image


def _png(size=(160, 120), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_base64_images_of_any_size_up_to_the_limit_decode():
    big = _png((160, 150))
    assert len(big) > 70_000  # the size that used to fail with "File name too long"
    image = request_image(_b64(big), 0, ServeConfig())
    assert image.size == (160, 150) and image.mode == "RGB"
    assert request_image(big, 1, ServeConfig()).size == (160, 150)  # raw bytes too


def test_client_paths_are_never_opened_and_existence_does_not_leak(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png())
    messages = set()
    for path in (str(photo), "/etc/passwd", str(tmp_path / "missing.png")):
        with pytest.raises(RequestError) as err:
            request_image(path, 3, ServeConfig())
        messages.add(str(err.value))
    assert messages == {"image 3: not base64-encoded image bytes; a served model does not open file paths "
                        "(serve.image_root allows one folder)"}


def test_paths_inside_the_allowed_root_only(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    limits = ServeConfig(image_root=str(root))
    assert request_image(str(root / "a.png"), 0, limits).size == (160, 120)
    assert request_image("a.png", 0, limits).size == (160, 120)  # relative to the root
    for escape in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        with pytest.raises(RequestError, match="does not open file paths"):
            request_image(escape, 0, limits)


def test_oversized_images_are_refused_before_decoding():
    data = _png((160, 150))
    with pytest.raises(RequestError, match=r"image 2: more than 1000 bytes \(serve.max_image_bytes\)"):
        request_image(_b64(data), 2, ServeConfig(max_image_bytes=1000))
    with pytest.raises(RequestError, match=r"image 0: \d+ bytes; at most 1000"):
        request_image(data, 0, ServeConfig(max_image_bytes=1000))
    flat = io.BytesIO()
    Image.new("L", (6000, 5000)).save(flat, format="PNG")  # 30 MP that compress to a few kB: a bomb's shape
    with pytest.raises(RequestError, match=r"6000x5000 pixels; at most 1000000 \(serve.max_image_pixels\)"):
        request_image(flat.getvalue(), 0, ServeConfig(max_image_pixels=1_000_000))
    bomb = decompression_bomb_png()  # 3.6 GP in a few hundred bytes: past Pillow's own limit, refused all the same
    assert len(bomb) < 1000
    for value in (bomb, _b64(bomb)):
        with pytest.raises(RequestError, match=r"image 0: more pixels than 40000000 \(serve.max_image_pixels\)"):
            request_image(value, 0, ServeConfig())


def test_garbage_is_a_one_line_refusal_without_the_payload():
    payload = "QUJD" * 10_000  # valid base64, not an image
    with pytest.raises(RequestError) as err:
        request_image(payload, 5, ServeConfig())
    assert str(err.value) == "image 5: not an image format this server reads"
    with pytest.raises(RequestError, match="image 0: not base64-encoded image bytes$"):
        request_image("%%%not base64%%%", 0, ServeConfig())


def test_request_size_and_decoding_bounds():
    check_request_size(64, ServeConfig())
    with pytest.raises(RequestError, match=r"65 images in one request; at most 64 \(serve.max_images\)"):
        check_request_size(65, ServeConfig())
    with pytest.raises(RequestError, match="no images"):
        check_request_size(0, ServeConfig())
    assert request_decoding({"num_beams": 3, "num_captions": 2}, ServeConfig()).num_captions == 2
    for params, limit in (({"num_beams": 64}, "serve.max_num_beams"), ({"max_new_tokens": 200}, "serve.max_new_tokens"),
                          ({"num_beams": 9, "num_captions": 9}, "serve.max_num_beams")):
        with pytest.raises(RequestError, match=limit):
            request_decoding(params, ServeConfig())
    with pytest.raises(RequestError, match="params.strategy"):
        request_decoding({"strategy": "telepathy"}, ServeConfig())


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory):
    from clipcap.config import MapperConfig
    from clipcap.modeling.captioner import save_captioner
    from clipcap.modeling.lms import load_lm
    from clipcap.modeling.model import ClipCap
    from clipcap.pipeline.pyfunc import ClipCapPyfunc

    lm = load_lm("tiny-gpt2:n_layer=1,n_embd=32", "smollm2-135m", seed=1)
    torch.manual_seed(0)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 1280, lm.model)
    folder = save_captioner(tmp_path_factory.mktemp("served") / "m", model, encoder="efficientnet-lite0:random",
                            lm_name="tiny-gpt2:n_layer=1,n_embd=32", tokenizer_name="smollm2-135m", lm_pretrained=False)
    served = ClipCapPyfunc()
    served.load_context(SimpleNamespace(artifacts={"captioner": str(folder)}, model_config={"max_images": 100}))
    return served


def test_the_served_model_captions_a_batch_of_100_base64_images(pyfunc_model):
    images = [_b64(_png((48, 40), seed=i)) for i in range(100)]
    captions = pyfunc_model.predict(None, pd.DataFrame({"image": images}), params={"max_new_tokens": 3})
    assert len(captions) == 100 and all(isinstance(c, str) for c in captions)
    several = pyfunc_model.predict(None, pd.DataFrame({"image": images[:2]}),
                                   params={"num_beams": 3, "num_captions": 2, "max_new_tokens": 3})
    assert [len(c) for c in several] == [2, 2]


def test_the_served_model_refuses_with_a_400_naming_the_image(pyfunc_model):
    with pytest.raises(MlflowException) as err:
        pyfunc_model.predict(None, pd.DataFrame({"image": [_b64(_png()), "/etc/passwd"]}))
    assert err.value.get_http_status_code() == 400
    assert err.value.message.startswith("image 1: not base64-encoded image bytes")
    assert "Traceback" not in err.value.message and "\n" not in err.value.message
    with pytest.raises(MlflowException, match="serve.max_images"):
        pyfunc_model.predict(None, pd.DataFrame({"image": [_b64(_png())] * 101}))


def test_large_photos_are_held_small():
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(big, format="JPEG")
    image = request_image(big.getvalue(), 0, ServeConfig())
    assert image.size == (1024, 768) and image.mode == "RGB"

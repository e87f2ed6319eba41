"""What a served captioner accepts and refuses (clipcap.modeling.serving and the pyfunc model), in process
with a tiny captioner: base64 of any size up to the limit, no client-given paths, bounded images, requests
and params, one-line refusals, and the same pixels as training and the CLI."""

import base64
import io
import math
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image, PngImagePlugin

from clipcap.config import ServeConfig
from helpers import decompression_bomb_png
from clipcap.modeling import serving
from clipcap.modeling.serving import (RequestError, RequestTimeout, check_request_size, request_decoding,
                                      request_pixels, request_sources)


def _png(size=(160, 120), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _as_array(image: Image.Image) -> torch.Tensor:
    """A preprocess that keeps the decoded image whole (height x width x RGB), to look at what was decoded."""
    return torch.from_numpy(np.asarray(image).copy())


def request_image(value, index: int, limits: ServeConfig) -> torch.Tensor:
    """One image of a request, decoded as the server decodes it (image ``index`` of the request)."""
    values = [_b64(_png((8, 8)))] * index + [value]
    return request_pixels(values, limits, _as_array)[index]


def test_base64_images_of_any_size_up_to_the_limit_decode():
    big = _png((160, 150))
    assert len(big) > 70_000  # the size that used to fail with "File name too long"
    pixels = request_image(_b64(big), 0, ServeConfig())
    assert pixels.shape == (150, 160, 3)
    assert torch.equal(pixels, torch.from_numpy(np.asarray(Image.open(io.BytesIO(big)).convert("RGB")).copy()))
    assert torch.equal(request_image(big, 1, ServeConfig()), pixels)  # raw bytes too


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
    assert request_image(str(root / "a.png"), 0, limits).shape == (120, 160, 3)
    assert request_image("a.png", 0, limits).shape == (120, 160, 3)  # relative to the root
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


def _gray_png(size) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 255).save(out, format="PNG")
    return out.getvalue()


def test_strips_are_refused_from_the_header_at_the_bound():
    """A 5 x 100,000 PNG is 3 KB; padded to a square it would be 10^10 pixels."""
    with pytest.raises(RequestError, match=r"^image 0: 5x100000, one side more than 32 times the other "
                                           r"\(serve.max_aspect_ratio\)$"):
        request_image(_gray_png((5, 100_000)), 0, ServeConfig())
    limits = ServeConfig(max_aspect_ratio=4)
    assert request_image(_gray_png((40, 10)), 0, limits).shape == (10, 40, 3)     # exactly 4: accepted
    with pytest.raises(RequestError, match="serve.max_aspect_ratio"):
        request_image(_gray_png((41, 10)), 0, limits)                              # just above: refused


def test_the_request_pixel_budget_counts_every_image_before_any_is_decoded(monkeypatch):
    decoded = []

    def load_rgb(*args, **kwargs):
        decoded.append(args)
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(serving, "load_rgb", load_rgb)
    limits = ServeConfig(max_request_pixels=3 * 100 * 100)
    images = [_gray_png((100, 100))] * 4        # each image within every per-image bound; 4 together are not
    with pytest.raises(RequestError, match=r"^images 0-3: 40,000 pixels in all; at most 30,000 per request "
                                           r"\(serve.max_request_pixels\)"):
        request_pixels(images, limits, _as_array)
    assert decoded == []                        # refused from the headers: nothing was decoded
    monkeypatch.undo()
    assert len(request_pixels(images[:3], limits, _as_array)) == 3   # exactly at the budget: accepted


def test_decoding_stops_at_the_deadline():
    images = [_png((64, 64), seed=i) for i in range(3)]
    with pytest.raises(RequestTimeout, match=r"longer than serve.max_seconds=20 \(stopped at image 0 of 3\)"):
        request_pixels(images, ServeConfig(), _as_array, deadline=time.monotonic() - 1)
    assert len(request_pixels(images, ServeConfig(), _as_array, deadline=time.monotonic() + 60)) == 3


def _png_with_chunk(kind: bytes, size: int) -> bytes:
    """A small PNG carrying one huge compressed text (zTXt) or colour profile (iCCP) chunk."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(out, format="PNG")
    data = out.getvalue()
    body = b"x\x00\x00" + zlib.compress(b"a" * size) if kind == b"zTXt" else b"p\x00\x00" + zlib.compress(b"\x00" * size)
    chunk = len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return data[:33] + chunk + data[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_huge_metadata_chunks_are_a_one_line_refusal(kind):
    data = _png_with_chunk(kind, 4_000_000)
    assert len(data) < 20_000
    with pytest.raises(RequestError) as err:
        request_image(data, 1, ServeConfig())
    assert str(err.value).startswith("image 1: the image") and "\n" not in str(err.value)


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
    limits = ServeConfig(max_num_beams=6, max_num_captions=2, max_new_tokens=30)
    assert request_decoding({"num_beams": 6, "num_captions": 2, "max_new_tokens": 30}, limits).num_beams == 6  # at
    for params, limit in (({"num_beams": 7}, "serve.max_num_beams"), ({"max_new_tokens": 31}, "serve.max_new_tokens"),
                          ({"num_beams": 4, "num_captions": 3}, "serve.max_num_captions")):
        with pytest.raises(RequestError, match=limit):
            request_decoding(params, limits)
    with pytest.raises(RequestError, match="params.strategy"):
        request_decoding({"strategy": "telepathy"}, ServeConfig())


@pytest.mark.parametrize("params, named", [
    ({"temperature": math.nan}, "params.temperature"), ({"temperature": math.inf}, "params.temperature"),
    ({"length_penalty": 1e308}, "length_penalty"), ({"length_penalty": math.nan}, "params.length_penalty"),
    ({"no_repeat_ngram_size": -5}, "no_repeat_ngram_size"), ({"top_p": math.nan}, "params.top_p"),
    ({"strategy": "x" * 5_000_000}, "params.strategy"), ({"x" * 100_000: 1}, "unknown key"),
    ("not a mapping" * 100_000, "params: expected a mapping"),
])
def test_nonsense_params_are_refused_in_one_short_line(params, named):
    with pytest.raises(RequestError) as err:
        request_decoding(params, ServeConfig())
    message = str(err.value)
    assert named in message and "\n" not in message and len(message) < 1000


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


def test_a_request_holds_the_encoders_input_not_its_images(pyfunc_model):
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(big, format="JPEG")
    held = request_pixels([big.getvalue()], ServeConfig(), pyfunc_model.captioner.encoder.preprocess)
    assert [tuple(p.shape) for p in held] == [(3, 224, 224)]


def test_the_served_model_passes_its_time_budget_to_generation(pyfunc_model, monkeypatch):
    seen = {}
    real = pyfunc_model.captioner.captions

    def spy(images, decoding, batch_size=16, max_time=None):
        seen["max_time"] = max_time
        return real(images, decoding, batch_size, max_time=max_time)

    monkeypatch.setattr(pyfunc_model.captioner, "captions", spy)
    monkeypatch.setattr(pyfunc_model, "limits", ServeConfig(max_images=100, max_seconds=7.5))
    pyfunc_model.predict(None, pd.DataFrame({"image": [_b64(_png((48, 40)))]}), params={"max_new_tokens": 2})
    assert 5 < seen["max_time"] <= 7.5   # what is left of serve.max_seconds after decoding, never more


def test_a_request_whose_images_outlast_the_budget_gets_a_504(pyfunc_model, monkeypatch):
    monkeypatch.setattr(pyfunc_model, "limits", ServeConfig(max_images=100, max_seconds=0.001))
    with pytest.raises(MlflowException) as err:
        pyfunc_model.predict(None, pd.DataFrame({"image": [_b64(_png((48, 40), seed=i)) for i in range(20)]}))
    assert err.value.get_http_status_code() == 504 and "serve.max_seconds" in err.value.message


def _transparent_rotated_png(path):
    """A stamp as users draw them: an object on a transparent background, with an EXIF orientation, so that
    a plain convert("RGB") (transparency -> black) or a loader that ignores EXIF gives other pixels."""
    rgba = np.zeros((40, 64, 4), dtype=np.uint8)
    rgba[5:20, 8:30] = (200, 30, 30, 255)          # an opaque red block, off-centre
    rgba[25:35, 40:60] = (20, 20, 200, 128)         # a half-transparent blue one
    exif = Image.Exif()
    exif[0x0112] = 6                                 # rotate 90 degrees when shown
    Image.fromarray(rgba, "RGBA").save(path, format="PNG", exif=exif.tobytes())
    return path


def _rotated_jpeg(path):
    """A photo as phones store it: pixels as the sensor saw them, an EXIF orientation to show them upright."""
    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[5:20, 8:30] = (200, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("make, name", [(_transparent_rotated_png, "stamp.png"), (_rotated_jpeg, "photo.jpg")])
def test_the_same_file_gives_bit_identical_pixels_on_every_path(pyfunc_model, tmp_path, make, name):
    """Training and evaluation (the embed stage: paths through a DataLoader), clipcap caption (paths), the
    Python API (PIL images) and the served model (bytes, base64, a path under image_root) show the encoder
    exactly the same tensor."""
    from clipcap.modeling.encoders import ImageDataset, pixels_of
    from clipcap.images import load_rgb

    path = make(tmp_path / name)
    preprocess = pyfunc_model.captioner.encoder.preprocess
    trained = ImageDataset([str(path)], preprocess)[0]
    data = path.read_bytes()
    served = request_pixels([data, _b64(data), name], ServeConfig(image_root=str(tmp_path)), preprocess)
    with Image.open(path) as opened:                # the Python API, given the image as the user opened it
        from_pil = ImageDataset([opened], preprocess)[0]
    for pixels in (*served, from_pil, pixels_of(load_rgb(path), preprocess)):
        assert torch.equal(pixels, trained)
    assert load_rgb(path).size == (40, 64)           # EXIF orientation applied: stored 64 x 40, shown 40 x 64
    if name.endswith(".png"):
        assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white, not black


def test_the_served_caption_equals_the_clis(pyfunc_model, tmp_path):
    path = _transparent_rotated_png(tmp_path / "stamp.png")
    captioner = pyfunc_model.captioner
    served = pyfunc_model.predict(None, pd.DataFrame({"image": [_b64(path.read_bytes())]}),
                                  params={"max_new_tokens": 6})
    from clipcap.config import DecodingConfig
    assert served == captioner.caption([str(path)], DecodingConfig(max_new_tokens=6))
    served_vector = captioner.embed(request_pixels([path.read_bytes()], ServeConfig(), captioner.encoder.preprocess))
    assert torch.equal(served_vector, captioner.embed([str(path)]))


def test_clipcap_caption_on_a_471_byte_strip_captions_it(pyfunc_model, tmp_path):
    """A 1 x 100,000 PNG once made the loader build a 100,000^2 canvas (MemoryError); the CLI path (a file,
    no serve limits) now bounds its shape before padding and captions it."""
    path = tmp_path / "strip.png"
    Image.new("L", (1, 100_000), 0).save(path, optimize=True)
    assert path.stat().st_size < 1000
    from clipcap.config import DecodingConfig
    (caption,) = pyfunc_model.captioner.caption([str(path)], DecodingConfig(max_new_tokens=2))
    assert pyfunc_model.captioner.embed([str(path)]).shape == (1, 1280)

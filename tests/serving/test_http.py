"""A registered clipcap model served by a real ``clipcap serve`` (MLflow's scoring app behind clipcap's
limits) on 127.0.0.1, tried as users and attackers would: images in every accepted form, and every kind
of bad request, each answered with the expected status in one short line while the server stays up; a
burst beyond the queue is answered 503 at once; SIGTERM under load stops it promptly.

The model is a tiny captioner (1-layer LM) registered through the project's own registry code, so the
test runs in about a minute; what is tested is the serving path, which is the same for any model.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decompression_bomb_png
from PIL import Image

pytestmark = pytest.mark.pipeline

STAMP = Path("/usr/share/tuxpaint/stamps/food/pizza.png")   # a real image file on the server's disk
SERVE = {"max_images": 64, "max_image_bytes": 2_000_000, "max_image_pixels": 40_000_000, "max_num_beams": 8,
         "max_num_captions": 8, "max_new_tokens": 64, "max_seconds": 3.0, "image_root": None,
         "max_request_bytes": 16_000_000, "max_concurrent": 2, "max_queued": 5}
# 2 + 5 slots: the six attack requests below and the normal one sent 0.2 s after them all find a slot even on a
# slow machine where the attacks are not refused yet (with 2 + 4 the normal one was once answered 503)


def _png(size: tuple[int, int], seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _strip() -> bytes:
    out = io.BytesIO()
    Image.new("L", (5, 100_000), 255).save(out, format="PNG")
    return out.getvalue()


def _white_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (6324, 6324), 255).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 40, 40)).save(out, format="JPEG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _frame(images: list[str], params: dict | None = None) -> bytes:
    body = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
    return json.dumps(body | ({"params": params} if params else {})).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow models serve`` of version 1 (champion) of clipcap-serving, registered by clipcap's registry."""
    from clipcap.config import MapperConfig, RegisterConfig
    from clipcap.modeling.captioner import save_captioner
    from clipcap.modeling.lms import load_lm
    from clipcap.modeling.model import ClipCap
    from clipcap.pipeline.registry import log_and_register

    root = tmp_path_factory.mktemp("serving")
    lm = load_lm("tiny-gpt2:n_layer=1,n_embd=32", "smollm2-135m", seed=1)
    torch.manual_seed(0)
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 1280, lm.model)
    folder = save_captioner(root / "captioner", model, encoder="efficientnet-lite0:random",
                            lm_name="tiny-gpt2:n_layer=1,n_embd=32", tokenizer_name="smollm2-135m", lm_pretrained=False)
    Image.open(STAMP).convert("RGB").save(root / "example.png")
    store = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # the experiment's artifact root (mlartifacts/) goes here
    try:
        log_and_register(RegisterConfig(tracking_uri=store, experiment="serving"), "serving", folder, {}, {"model_CIDEr": 0.1},
                         {}, files=[], example_image=str(root / "example.png"), test_set="t", serve=SERVE)
    finally:
        os.chdir(cwd)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "clipcap.cli", "serve", "--model", "models:/clipcap-serving@champion",
         "--tracking-uri", store, "--host", "127.0.0.1", "--port", str(port)], cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):
            if _alive(base):
                break
            assert process.poll() is None, "mlflow models serve exited"
            time.sleep(0.25)
        yield base, process, root
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _alive(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _post(base: str, data: bytes, content_type: str = "application/json", timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(f"{base}/invocations", data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _message(body: str) -> str:
    return json.loads(body).get("message", "")


def test_requests_and_attacks_over_http(server):
    base, process, root = server
    photo = _png((200, 200))                       # ~120 KB of PNG, ~160 KB as base64
    assert len(_b64(photo)) > 100_000
    many = [_b64(_png((48, 40), seed=i)) for i in range(32)]
    missing = "/nonexistent/photo.png"
    table: list[tuple[str, int, bool]] = []

    def attempt(what: str, data: bytes, content_type: str = "application/json") -> tuple[int, str]:
        status, body = _post(base, data, content_type)
        table.append((what, status, _alive(base)))
        assert "Traceback" not in body and "stack_trace" not in body, f"{what}: {body[:500]}"
        assert len(body) < 2_000 or status == 200, f"{what}: a {len(body):,}-byte error body"
        return status, body

    example = next(root.rglob("serving_input_example.json"))  # logged with the model: its own request format
    status, body = attempt("the model's serving_input_example.json", example.read_bytes())
    assert status == 200 and isinstance(json.loads(body)["predictions"][0], str), body
    status, body = attempt("base64 PNG of 160 KB", _frame([_b64(photo)]))
    assert status == 200 and isinstance(json.loads(body)["predictions"][0], str), body
    status, body = attempt("base64 JPEG", _frame([_b64(_jpeg())], {"num_beams": 2, "num_captions": 2}))
    assert status == 200 and len(json.loads(body)["predictions"][0]) == 2, body
    status, body = attempt("32 images in one request", _frame(many))
    assert status == 200 and len(json.loads(body)["predictions"]) == 32, body

    refusals = {}
    for what, value in (("a path on the server", str(STAMP)), ("/etc/passwd", "/etc/passwd"),
                        ("a missing path", missing)):
        status, body = attempt(what, _frame([value]))
        assert status == 400, body
        refusals[what] = _message(body)
    assert len(set(refusals.values())) == 1  # one message whether the file exists, is no image, or is missing
    assert "not base64-encoded image bytes" in refusals["/etc/passwd"]
    assert "passwd" not in refusals["/etc/passwd"] and "pizza" not in refusals["a path on the server"]

    status, body = attempt("malformed JSON (1 MB)", b'{"dataframe_split": {"columns": ["image"], "data": [["'
                           + b"A" * 1_000_000)
    assert status == 400 and len(body) < 1000 and "AAAA" not in body, body
    status, body = attempt("10,000-deep JSON", b"[" * 10_000 + b"]" * 10_000)
    assert status == 400 and len(body) < 1000, body
    status, body = attempt("wrong column", json.dumps(
        {"dataframe_split": {"columns": ["picture"], "data": [[_b64(photo)]]}}).encode())
    assert 400 <= status < 500 and _b64(photo)[:40] not in body, body
    status, body = attempt("a 5 MB strategy", _frame([_b64(photo)], {"strategy": "x" * 5_000_000}))
    assert status == 400 and "params.strategy" in _message(body) and len(body) < 1000, body
    status, body = attempt("params not a mapping", json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [[_b64(photo)]]}, "params": "y" * 100_000}).encode())
    assert 400 <= status < 500 and "yyyy" not in body, body
    for name, value in (("temperature", "NaN"), ("temperature", "Infinity"), ("length_penalty", "1e308"),
                        ("no_repeat_ngram_size", "-5")):
        data = _frame([_b64(photo)]).replace(b'}}', b'}, "params": {"strategy": "sample", "' + name.encode()
                                             + b'": ' + value.encode() + b'}}')
        status, body = attempt(f"{name} {value}", data)
        assert status == 400 and name in _message(body), body
    status, body = attempt("a body over serve.max_request_bytes", b'{"x": "' + b"z" * 17_000_000 + b'"}')
    assert status == 413 and len(body) < 1000, body
    status, body = attempt("a 5 x 100,000 PNG (3 KB)", _frame([_b64(_strip())]))
    assert status == 400 and "serve.max_aspect_ratio" in _message(body), body
    status, body = attempt("not an image", _frame([_b64(os.urandom(3000))]))
    assert status == 400 and "image 0" in _message(body), body
    status, body = attempt("decompression bomb as bytes", _frame([_b64(decompression_bomb_png())]))
    assert status == 400 and "pixels" in _message(body), body
    oversized = _b64(os.urandom(3_000_000))  # over serve.max_image_bytes (2 MB here)
    status, body = attempt("oversized image payload (4 MB)", _frame([oversized]))
    assert status == 400 and "max_image_bytes" in _message(body) and oversized[:50] not in body, body
    for what, params, limit in (("num_beams 64", {"num_beams": 64}, "max_num_beams"),
                                ("num_captions 64 (sampling)", {"strategy": "sample", "num_captions": 64}, "max_num_captions"),
                                ("max_new_tokens 100000", {"max_new_tokens": 100_000}, "max_new_tokens")):
        status, body = attempt(f"abusive params: {what}", _frame([_b64(photo)], params))
        assert status == 400 and limit in _message(body), body
    status, body = attempt("65 images (over serve.max_images)", _frame(many * 2 + many[:1]))
    assert status == 400 and "max_images" in _message(body), body

    # six requests of 64 white 6,324 x 6,324 PNGs (inside every per-image bound) at once, and a normal request
    # during them: the request pixel budget refuses each from the headers, nothing is decoded
    white = _b64(_white_png())
    attack = _frame([white] * 64)
    with ThreadPoolExecutor(7) as pool:
        attacks = [pool.submit(_post, base, attack, timeout=300) for _ in range(6)]
        time.sleep(0.2)
        started = time.monotonic()
        status, body = _post(base, _frame([_b64(photo)]))
        during = time.monotonic() - started
        answers = [a.result() for a in attacks]
    table.append(("6 requests of 64 white 6,324^2 PNGs + a normal one", answers[0][0], _alive(base)))
    assert status == 200 and during < 5, (status, during, body)
    assert all(code == 400 and "serve.max_request_pixels" in _message(text) for code, text in answers), answers[0]

    # six requests at every limit at once: each is bounded by serve.max_seconds, none takes the server down
    heaviest = _frame(many * 2, {"num_beams": 8, "num_captions": 8, "max_new_tokens": 64})
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _post(base, heaviest, timeout=300), range(6)))
    heavy_seconds = time.monotonic() - started
    table.append((f"6 requests at every limit in parallel ({heavy_seconds:.0f} s)", answers[0][0], _alive(base)))
    assert all(status == 200 and len(json.loads(body)["predictions"]) == 64 for status, body in answers)

    started = time.monotonic()
    status, body = attempt("a normal request after all of them", _frame([_b64(photo)]))
    normal_seconds = time.monotonic() - started
    assert status == 200 and normal_seconds < 5, (status, normal_seconds)
    assert all(alive for _, _, alive in table)
    print("\n| request | status | server alive after |\n|---|---|---|")
    print("\n".join(f"| {what} | {status} | {'yes' if alive else 'NO'} |" for what, status, alive in table))
    print(f"normal request after the attacks: {normal_seconds:.2f} s")

    # a burst past serve.max_concurrent + serve.max_queued: the extra requests get 503 at once, the rest 200
    slow = _frame(many * 2, {"num_beams": 8, "max_new_tokens": 64})
    with ThreadPoolExecutor(SERVE["max_concurrent"] + SERVE["max_queued"] + 3) as pool:
        burst = list(pool.map(lambda _: _post(base, slow, timeout=300),
                              range(SERVE["max_concurrent"] + SERVE["max_queued"] + 3)))
    codes = sorted(code for code, _ in burst)
    assert set(codes) == {200, 503} and codes.count(200) >= SERVE["max_concurrent"] + SERVE["max_queued"], codes
    assert all(len(text) < 1000 for code, text in burst if code == 503)

    # SIGTERM while requests are running
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(_post, base, slow, 300)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGTERM)
        started = time.monotonic()
        process.wait(timeout=60)
        assert time.monotonic() - started < 10

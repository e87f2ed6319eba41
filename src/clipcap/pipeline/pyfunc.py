"""The MLflow pyfunc wrapper of a captioner, logged as "models from code" (no pickle).

Request (``POST /invocations``, JSON)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/JPEG bytes>"], ...]},
     "params": {"num_beams": 3, "num_captions": 2}}

``image``: base64-encoded image bytes (or raw bytes in Python); a file path only inside the
folder ``serve.image_root`` names (None by default: a served model opens no client-given path).
In Python, ``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [...]}))`` takes the
same, and ``model_config={"image_root": "/data/photos"}`` at load time allows paths under it.
Params: the fields of :class:`clipcap.config.DecodingConfig`. Response: one caption per image, or
a list of ``num_captions`` captions per image when that param is above 1.

Limits (:class:`clipcap.config.ServeConfig`, the ``serve`` section of params.yaml, stored with the
model): images per request, bytes, pixels and shape per image and pixels per request (read from the
headers before anything is decoded), beams, captions and new tokens, and seconds per request for
decoding the images and generation together. Images are decoded by the loader training uses and
held only as the encoder's input. A request beyond a limit, or with an unreadable image, is refused
with HTTP 400 and a one-line reason naming the image by position; one whose images take longer than
its seconds to decode gets 504. ``clipcap serve`` adds the server's own limits (body size, requests
at once, a bounded queue: :mod:`clipcap.pipeline.server`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE


class RequestRefused(MlflowException):
    """A 400 whose message stays the one line it was made with: MLflow's scoring server prefixes the
    message of an error raised by ``predict`` with the request's data ("Failed to predict data '...'"),
    which would echo the payload - client paths, base64 - back in the error body."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        from clipcap.modeling.serving import REFUSAL_MARK

        super().__init__(message, error_code=error_code, **{REFUSAL_MARK: True})

    @property
    def message(self) -> str:
        return self._refusal

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_refusal"):  # set once, by MlflowException.__init__
            self._refusal = value


class ClipCapPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from clipcap.config import ServeConfig, config_from_mapping
        from clipcap.modeling.captioner import Captioner

        self.captioner = Captioner.load(context.artifacts["captioner"])
        self.limits = config_from_mapping(ServeConfig, dict(getattr(context, "model_config", None) or {}), "serve")

    def predict(self, context, model_input, params=None) -> list:
        from clipcap.modeling.serving import (RequestError, RequestTimeout, check_request_size, request_decoding,
                                              request_pixels)

        deadline = time.monotonic() + self.limits.max_seconds  # decoding the images and generation, together
        try:
            if isinstance(model_input, pd.DataFrame):
                if "image" not in model_input.columns:
                    raise RequestError(f"the input needs an 'image' column; it has {len(model_input.columns)} "
                                       "other columns")
                values = model_input["image"].tolist()
            else:
                values = list(model_input)
            check_request_size(len(values), self.limits)
            decoding = request_decoding(params, self.limits)
            pixels = request_pixels(values, self.limits, self.captioner.encoder.preprocess, deadline)
        except RequestTimeout as err:
            raise RequestRefused(str(err), DEADLINE_EXCEEDED) from None
        except RequestError as err:
            raise RequestRefused(str(err)) from None
        finally:
            release_memory()  # the decoded images are gone: keep the process at its idle size
        # one batch: generation is one generate() call, so the deadline bounds the whole request
        found = self.captioner.captions(pixels, decoding, batch_size=len(pixels),
                                        max_time=max(deadline - time.monotonic(), 0.05))
        return [c[0] for c in found] if decoding.num_captions == 1 else found


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise: a served model's resident size
    would stay at its largest request's)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = None
try:
    _name = ctypes.util.find_library("c")
    _LIBC = ctypes.CDLL(_name) if _name else None
    if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # musl, macOS: nothing to do
        _LIBC = None
except OSError:
    _LIBC = None


mlflow.models.set_model(ClipCapPyfunc())

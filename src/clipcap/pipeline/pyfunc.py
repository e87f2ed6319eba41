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
model): images per request, bytes and pixels per image (the pixels read from the header before
decoding; images are held at most 1024 px on a side), beams, captions and new tokens, and seconds
of generation per request. A request beyond them, or
with an unreadable image, is refused with HTTP 400 and a one-line reason naming the image by position.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class RequestRefused(MlflowException):
    """A 400 whose message stays the one line it was made with: MLflow's scoring server prefixes the
    message of an error raised by ``predict`` with the request's data ("Failed to predict data '...'"),
    which would echo the payload - client paths, base64 - back in the error body."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

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
        from clipcap.modeling.serving import RequestError, check_request_size, request_decoding, request_image

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
            images = [request_image(value, index, self.limits) for index, value in enumerate(values)]
        except RequestError as err:
            raise RequestRefused(str(err)) from None
        # one batch: generation is one generate() call, so serve.max_seconds bounds the whole request
        found = self.captioner.captions(images, decoding, batch_size=len(images), max_time=self.limits.max_seconds)
        return [c[0] for c in found] if decoding.num_captions == 1 else found


mlflow.models.set_model(ClipCapPyfunc())

"""The MLflow pyfunc wrapper of a captioner, logged as "models from code" (no pickle).

Input: a DataFrame with an ``image`` column (file paths, or base64-encoded image bytes for
HTTP serving), or a plain list of paths. Output: one caption per image, or a list of
``num_captions`` captions per image when that param is above 1.
Params: the fields of :class:`clipcap.config.DecodingConfig` (``strategy``, ``num_beams``,
``max_new_tokens``, ``length_penalty``, ``no_repeat_ngram_size``, ``top_p``, ``temperature``,
``num_captions``).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image


def _as_image(value):
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    text = str(value)
    if Path(text).exists():
        return text
    try:
        return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")
    except (binascii.Error, ValueError, OSError) as err:
        raise ValueError(f"image {text[:80]!r} is neither an existing file path nor base64 image bytes") from err


class ClipCapPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from clipcap.modeling.captioner import Captioner

        self.captioner = Captioner.load(context.artifacts["captioner"])

    def predict(self, context, model_input, params=None) -> list[str]:
        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(f"input needs an 'image' column, got columns {list(model_input.columns)}")
            values = model_input["image"].tolist()
        else:
            values = list(model_input)
        images = [_as_image(v) for v in values]
        from clipcap.config import DecodingConfig, config_from_mapping

        decoding = config_from_mapping(DecodingConfig, dict(params), "params")
        found = self.captioner.captions(images, decoding)
        return [c[0] for c in found] if decoding.num_captions == 1 else found


mlflow.models.set_model(ClipCapPyfunc())

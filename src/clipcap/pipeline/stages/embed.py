"""``clipcap embed``: encode the clean manifest's images that the embedding store lacks."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from clipcap.config import Config
from clipcap.data.manifest import read_manifest
from clipcap.fileio import write_json
from clipcap.modeling.encoders import ImageEncoder, build_encoder, encode_images
from clipcap.pipeline.embedding_store import EmbeddingStore
from clipcap.pipeline.layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedStats:
    total: int
    encoded: int
    reused: int


def run(cfg: Config, layout: Layout | None = None) -> EmbedStats:
    layout = layout or Layout.of(cfg.dataset.name)
    frame = read_manifest(layout.manifest)
    encoder = build_encoder(cfg.encoder.name)
    store = EmbeddingStore(layout.embeddings, encoder.key)
    stats = embed_missing(frame["image_id"].tolist(), frame["path"].tolist(), encoder, store,
                          batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers)
    log.info("embed: %d images, %d encoded, %d reused -> %s", stats.total, stats.encoded, stats.reused, store.dir)
    write_json(layout.embed_summary, asdict(stats))
    return stats


def embed_missing(image_ids: list[str], paths: list[str], encoder: ImageEncoder, store: EmbeddingStore,
                  batch_size: int = 32, num_workers: int = 0, shard_size: int = 1024) -> EmbedStats:
    """Encode the images whose ids the store lacks, in one pass over one DataLoader, writing a
    shard every ``shard_size`` images: memory holds one shard of vectors, never the images, and
    a killed run loses at most the shard in progress."""
    path_of = dict(zip(image_ids, paths))
    store.repair()
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

"""``clipcap embed``: encode the clean manifest's images that the embedding store lacks.

Scaled out, ``clipcap embed --part I/N`` encodes only part I of N of them (split by image id, so every
process agrees without talking to the others), writing shards under its own name; run the N parts
anywhere the store is reachable (``flows/parts.py`` runs them as parallel Prefect tasks), then plain
``clipcap embed`` (the DVC stage) finds nothing left to encode and merges the index.

The stage also writes ``vectors.json``: a digest of the vectors the manifest's images map to, in manifest
order. That file, not the store, is what the later stages depend on in ``dvc.yaml``: a damaged shard set
aside and re-encoded (a new file, so a new hash of the store folder) changes nothing after this stage when
its images encode to the same bytes again, as they do on one machine with the same batches (checked on
this CPU; another thread count or batch can round the last bits differently, and then training re-runs).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clipcap.config import Config
from clipcap.data.manifest import read_manifest
from clipcap.errors import ClipcapError
from clipcap.fileio import read_json, write_json
from clipcap.modeling.encoders import ImageEncoder, build_encoder, encode_images
from clipcap.pipeline.embedding_store import EmbeddingStore, read_shard
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.parts import in_part, part_name

log = logging.getLogger(__name__)
VECTORS = "vectors.json"  # artifacts/<dataset>/vectors.json: what train, evaluate and register depend on


def vectors_path(layout: Layout) -> Path:
    return layout.root / VECTORS


@dataclass(frozen=True)
class EmbedStats:
    total: int
    encoded: int
    reused: int


def run(cfg: Config, layout: Layout | None = None, part: tuple[int, int] | None = None) -> EmbedStats:
    layout = layout or Layout.of(cfg.dataset.name)
    frame = read_manifest(layout.manifest)
    if part is not None:
        frame = frame[[in_part(i, part) for i in frame["image_id"]]]
    encoder = build_encoder(cfg.encoder.name)
    writer = None if part is None else part_name(part)
    store = EmbeddingStore(layout.embeddings, encoder.key, writer=writer)
    stats = embed_missing(frame["image_id"].tolist(), frame["path"].tolist(), encoder, store,
                          batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers)
    log.info("embed%s: %d images, %d encoded, %d reused -> %s", f" part {part[0] + 1}/{part[1]}" if part else "",
             stats.total, stats.encoded, stats.reused, store.dir)
    if part is None:
        store.merge()  # takes in the shards parts wrote
        write_json(layout.embed_summary, asdict(stats) | _earlier_parts(layout))
        write_json(vectors_path(layout), vectors_summary(store, frame["image_id"].tolist()))
    else:
        write_json(layout.root / f"embed-{writer}.json", asdict(stats))
    return stats


def vectors_summary(store: EmbeddingStore, image_ids: list[str]) -> dict:
    """The store's vectors for ``image_ids`` as a digest: sha256 over each image's own digest (of its id and
    its vector's float32 bytes) in the order of ``image_ids`` (repeats dropped). It changes exactly when an
    image, its order or a single bit of its vector does, not when the same vectors move to other shard files.
    Each shard is read once, and memory holds one shard and 32 bytes per image, never all the vectors."""
    order = list(dict.fromkeys(image_ids))
    index = store.index()
    by_shard: dict[str, list[tuple[str, int]]] = {}
    for image_id in order:
        if image_id not in index:
            raise ClipcapError(f"{image_id} has no embedding under {store.dir}: run 'clipcap embed'")
        shard, row = index[image_id]
        by_shard.setdefault(shard, []).append((image_id, row))
    digests: dict[str, bytes] = {}
    dim = None
    for shard, pairs in sorted(by_shard.items()):
        _, block = read_shard(store.dir / shard)
        vectors = block.float().contiguous().numpy()
        dim = vectors.shape[1]
        for image_id, row in pairs:
            digests[image_id] = hashlib.sha256(image_id.encode() + b"\0" + vectors[row].tobytes()).digest()
    total = hashlib.sha256()
    for image_id in order:
        total.update(digests[image_id])
    return {"encoder": store.encoder_key, "images": len(order), "dim": dim, "dtype": "float32",
            "sha256": total.hexdigest()}


def _earlier_parts(layout: Layout) -> dict:
    """What parts run before this stage encoded (their reports, consumed): the images this run's data
    cost, wherever they were encoded."""
    found = sorted(layout.root.glob("embed-part*.json"))
    if not found:
        return {}
    parts = {p.stem.removeprefix("embed-"): read_json(p)["encoded"] for p in found}
    for p in found:
        p.unlink()
    return {"encoded_by_parts": parts}


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

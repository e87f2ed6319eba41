"""Embeddings stored by (encoder key, image content hash) in append-only safetensors shards.

Layout under ``<root>/<encoder slug>/``:

- ``shard-NNNNNN.safetensors``: an ``embeddings`` tensor and, in its metadata, the ordered
  image ids and the encoder key. Shards are the truth; each is written atomically (temporary
  file + rename), so a killed run leaves only complete shards.
- ``index.json``: image id -> (shard, row) for every shard, rewritten atomically after each new
  shard. It is a cache: when it is missing or does not list exactly the shards on disk (a run
  killed between a shard and its index update), it is rebuilt in memory from the shards'
  metadata, and written with the next shard.

A re-run encodes only the ids no shard holds. Another encoder (or other weights) has another
key, hence another folder: changing the encoder re-encodes everything, keeping the old store.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

INDEX = "index.json"


class MissingEmbeddingError(ClipcapError, KeyError):
    pass


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", key)


class EmbeddingStore:
    def __init__(self, root: str | Path, encoder_key: str) -> None:
        self.encoder_key = encoder_key
        self.dir = Path(root) / _slug(encoder_key)
        self._index: dict[str, tuple[str, int]] | None = None

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors"))

    def index(self) -> dict[str, tuple[str, int]]:
        """image id -> (shard file name, row), from ``index.json`` or rebuilt from the shards."""
        if self._index is None:
            names = [p.name for p in self.shards()]
            saved = read_json(self.dir / INDEX) if (self.dir / INDEX).exists() else None
            if saved is not None and saved.get("shards") == names:
                self._index = {k: (v[0], v[1]) for k, v in saved["ids"].items()}
            else:
                self._index = self._rebuild_index()
                if names:
                    log.info("rebuilt the index of %s from %d shards", self.dir, len(names))
        return self._index

    def _rebuild_index(self) -> dict[str, tuple[str, int]]:
        index: dict[str, tuple[str, int]] = {}
        for shard in self.shards():
            with safe_open(shard, framework="pt") as handle:
                ids = json.loads(handle.metadata()["ids"])
            for row, image_id in enumerate(ids):
                index.setdefault(image_id, (shard.name, row))
        return index  # written by the next add(): readers never write

    def _write_index(self, index: dict[str, tuple[str, int]]) -> None:
        write_json(self.dir / INDEX, {"encoder": self.encoder_key, "shards": [p.name for p in self.shards()],
                                      "ids": {k: list(v) for k, v in index.items()}})

    def __len__(self) -> int:
        return len(self.index())

    def missing(self, image_ids: list[str]) -> list[str]:
        index = self.index()
        return [i for i in dict.fromkeys(image_ids) if i not in index]

    def add(self, image_ids: list[str], embeddings: torch.Tensor) -> Path:
        """Write one new shard atomically, then the index."""
        if len(image_ids) != embeddings.shape[0]:
            raise ValueError(f"{len(image_ids)} ids for {embeddings.shape[0]} embeddings")
        index = self.index()
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self.shards()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.dir / f"shard-{number:06d}.safetensors"
        metadata = {"ids": json.dumps(image_ids), "encoder": self.encoder_key}
        with atomic_path(path) as tmp:
            save_file({"embeddings": embeddings.detach().float().contiguous().cpu()}, str(tmp), metadata=metadata)
        for row, image_id in enumerate(image_ids):
            index.setdefault(image_id, (path.name, row))
        self._write_index(index)
        return path

    def get(self, image_ids: list[str]) -> torch.Tensor:
        """Embeddings for ``image_ids`` in that order; the error names the first missing id."""
        index = self.index()
        absent = [i for i in image_ids if i not in index]
        if absent:
            raise MissingEmbeddingError(
                f"{len(absent)} images have no embedding under {self.dir} (first: {absent[0]}); run 'clipcap embed'"
            )
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, image_id in enumerate(image_ids):
            shard, row = index[image_id]
            by_shard.setdefault(shard, []).append((position, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            with safe_open(self.dir / shard, framework="pt") as handle:
                block = handle.get_tensor("embeddings")
            if out is None:
                out = torch.empty(len(image_ids), block.shape[1])
            positions, rows = zip(*pairs)
            out[list(positions)] = block[list(rows)]
        return out if out is not None else torch.empty(0, 0)

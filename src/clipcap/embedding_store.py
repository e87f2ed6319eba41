"""Embeddings stored by (encoder key, image content hash) in append-only safetensors shards.

Layout: ``<root>/<encoder slug>/shard-NNNNNN.safetensors``; each shard holds an
``embeddings`` tensor and, in its metadata, the ordered image ids. A shard is written
atomically, so a killed run leaves only complete shards and a re-run encodes just what no
shard holds yet. Changing the encoder (or its weights) changes the key, hence the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path


class MissingEmbeddingError(ClipcapError, KeyError):
    pass


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", key)


class EmbeddingStore:
    def __init__(self, root: str | Path, encoder_key: str) -> None:
        self.encoder_key = encoder_key
        self.dir = Path(root) / _slug(encoder_key)
        self._index: dict[str, tuple[Path, int]] | None = None

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors"))

    def index(self) -> dict[str, tuple[Path, int]]:
        """image id -> (shard, row), read from shard metadata only (no tensors loaded)."""
        if self._index is None:
            index: dict[str, tuple[Path, int]] = {}
            for shard in self.shards():
                with safe_open(shard, framework="pt") as handle:
                    ids = json.loads(handle.metadata()["ids"])
                for row, image_id in enumerate(ids):
                    index.setdefault(image_id, (shard, row))
            self._index = index
        return self._index

    def missing(self, image_ids: list[str]) -> list[str]:
        index = self.index()
        return [i for i in dict.fromkeys(image_ids) if i not in index]

    def add(self, image_ids: list[str], embeddings: torch.Tensor) -> Path:
        """Write one new shard atomically."""
        if len(image_ids) != embeddings.shape[0]:
            raise ValueError(f"{len(image_ids)} ids for {embeddings.shape[0]} embeddings")
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self.shards()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.dir / f"shard-{number:06d}.safetensors"
        metadata = {"ids": json.dumps(image_ids), "encoder": self.encoder_key}
        with atomic_path(path) as tmp:
            save_file({"embeddings": embeddings.detach().float().contiguous().cpu()}, str(tmp), metadata=metadata)
        if self._index is not None:
            for row, image_id in enumerate(image_ids):
                self._index.setdefault(image_id, (path, row))
        return path

    def get(self, image_ids: list[str]) -> torch.Tensor:
        """Embeddings for ``image_ids`` in that order; KeyError names the first missing id."""
        index = self.index()
        absent = [i for i in image_ids if i not in index]
        if absent:
            raise MissingEmbeddingError(
                f"{len(absent)} images have no embedding under {self.dir} (first: {absent[0]}); run 'clipcap embed'"
            )
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, image_id in enumerate(image_ids):
            shard, row = index[image_id]
            by_shard.setdefault(shard, []).append((position, row))
        out: torch.Tensor | None = None
        for shard, pairs in by_shard.items():
            with safe_open(shard, framework="pt") as handle:
                block = handle.get_tensor("embeddings")
            if out is None:
                out = torch.empty(len(image_ids), block.shape[1])
            positions, rows = zip(*pairs)
            out[list(positions)] = block[list(rows)]
        return out if out is not None else torch.empty(0, 0)

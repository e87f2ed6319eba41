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

Shards are verified, not trusted: each records the sha256 of its embedding bytes in its metadata.
``clipcap embed`` checks every shard (:meth:`EmbeddingStore.repair`): a truncated, unreadable or
altered one is moved to ``damaged/`` (kept for inspection, never deleted) and its images are
encoded again. Readers (:meth:`EmbeddingStore.get`) check the shards they read and stop with an
error naming the shard and the fix, so a damaged store is never trained on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clipcap.errors import ClipcapError
from clipcap.fileio import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

INDEX = "index.json"
DAMAGED = "damaged"


class MissingEmbeddingError(ClipcapError, KeyError):
    pass


class DamagedShardError(ClipcapError):
    pass


class StoreWriteError(ClipcapError):
    """A shard or the index could not be written (a full disk, a read-only folder)."""


def _digest(embeddings: torch.Tensor) -> str:
    return hashlib.sha256(embeddings.numpy().tobytes()).hexdigest()


def read_shard(path: Path) -> tuple[list[str], torch.Tensor]:
    """(image ids, embeddings) of a shard whose bytes match its recorded digest, else DamagedShardError
    saying what is wrong with it: unreadable, altered since it was written, or holding non-finite values
    (shards written before digests were recorded are checked for the first and the last only)."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings")
        ids = json.loads(metadata["ids"])
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise DamagedShardError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
        raise DamagedShardError(f"{path}: {len(ids)} ids for embeddings of shape {tuple(embeddings.shape)}")
    recorded = metadata.get("sha256")
    if recorded is not None and _digest(embeddings) != recorded:
        raise DamagedShardError(f"{path}: its embeddings do not match the digest recorded when it was written")
    if not torch.isfinite(embeddings).all():
        raise DamagedShardError(f"{path}: holds non-finite values (NaN or inf)")
    return ids, embeddings


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", key)


class EmbeddingStore:
    """``writer``: a name for the shards this instance writes (``shard-<writer>-NNNNNN``), so several
    processes or machines can fill one store at once without colliding; a named writer leaves the
    index alone (each would overwrite the others'), and :meth:`merge` writes it once they are done."""

    def __init__(self, root: str | Path, encoder_key: str, writer: str | None = None) -> None:
        if writer is not None and not re.fullmatch(r"[A-Za-z0-9_]+", writer):
            raise ValueError(f"writer name {writer!r}: letters, digits and '_' only")
        self.encoder_key = encoder_key
        self.writer = writer
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
            ids, _ = read_shard(shard)
            for row, image_id in enumerate(ids):
                index.setdefault(image_id, (shard.name, row))
        return index  # written by the next add(): readers never write

    def repair(self) -> list[Path]:
        """Check every shard; move the damaged ones to ``damaged/`` (their images then count as
        missing, so the next encoding pass re-creates them) and return where they went."""
        moved = []
        for shard in self.shards():
            try:
                read_shard(shard)
            except DamagedShardError as err:
                target = self.dir / DAMAGED / shard.name
                target.parent.mkdir(exist_ok=True)
                shard.replace(target)
                moved.append(target)
                log.warning("%s; moved to %s, its images will be encoded again", err, target)
        if moved:
            self._index = self._rebuild_index()
            self._write_index(self._index)
        return moved

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
        prefix = f"shard-{self.writer}-" if self.writer else "shard-"
        existing = sorted(self.dir.glob(f"{prefix}[0-9]*.safetensors"))
        number = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        path = self.dir / f"{prefix}{number:06d}.safetensors"
        embeddings = embeddings.detach().float().contiguous().cpu()
        finite = torch.isfinite(embeddings).all(dim=1).tolist()
        if not all(finite):
            bad = [image_id for image_id, ok in zip(image_ids, finite) if not ok]
            raise ClipcapError(f"the encoder {self.encoder_key} gave NaN or inf for {len(bad)} of {len(image_ids)} "
                               f"images (first: {bad[0]}); nothing of this batch was stored: check that image "
                               "and the encoder's weights")
        metadata = {"ids": json.dumps(image_ids), "encoder": self.encoder_key, "sha256": _digest(embeddings)}
        try:
            with atomic_path(path) as tmp:  # a failed write leaves no shard, not even a partial one
                save_file({"embeddings": embeddings}, str(tmp), metadata=metadata)
        except (OSError, SafetensorError) as err:
            raise StoreWriteError(self._write_failed(f"shard {path.name}", err,
                                                     "nothing of this batch was stored")) from err
        for row, image_id in enumerate(image_ids):
            index.setdefault(image_id, (path.name, row))
        if self.writer is None:
            try:
                self._write_index(index)
            except OSError as err:  # the shard is whole; the index is a cache, rebuilt from the shards
                raise StoreWriteError(self._write_failed(INDEX, err, f"shard {path.name} was stored whole")) from err
        return path

    def _write_failed(self, what: str, err: Exception, kept: str) -> str:
        """One line: which write in the store failed, why, what is kept, and the fix."""
        reason = (err.strerror if isinstance(err, OSError) and err.strerror
                  else (str(err).splitlines() or [type(err).__name__])[0][:300])
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in str(err)
        fix = "free space on its disk" if full else "check that the folder is writable and its disk has room"
        return (f"{self.dir}: could not write the embedding {what} ({reason}); {kept}: {fix}, then run "
                "'clipcap embed' again (what is stored is kept)")

    def merge(self) -> int:
        """Index every shard on disk, whoever wrote it (after parallel writers), and write the index;
        the number of images the store holds."""
        self._index = None
        index = self.index()
        if self.dir.is_dir():
            self._write_index(index)
        return len(index)

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
            try:
                _, block = read_shard(self.dir / shard)
            except DamagedShardError as err:
                raise DamagedShardError(f"{err}. Run 'clipcap embed' (or 'dvc repro'): it sets damaged shards "
                                        "aside and encodes their images again") from err
            if out is None:
                out = torch.empty(len(image_ids), block.shape[1])
            positions, rows = zip(*pairs)
            out[list(positions)] = block[list(rows)]
        return out if out is not None else torch.empty(0, 0)

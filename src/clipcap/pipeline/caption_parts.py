"""Captions of the test split made ahead of the evaluate stage, in parts, on other processes or machines
(``clipcap evaluate --part I/N``; ``flows/parts.py`` runs the parts on a Dask cluster). Each part writes its
captions under a key of exactly what made them - the model folder's ``config.json`` (which holds the digest
of every file of the captioner) and the ``evaluate`` settings - so the stage takes a caption only when its
own run would have made the same one, and captions the rest itself. The stage consumes the folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from clipcap.fileio import write_text


def captions_key(model_dir: Path, settings: dict) -> str:
    """A digest of the captioner (its ``config.json``) and the ``evaluate`` settings that caption with it."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


class CaptionParts:
    """``<folder>/<key>/<part>.jsonl``: one ``{"image_id", "caption"}`` per line, each file written whole."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def write(self, part: str, captions: dict[str, str]) -> Path:
        path = self.folder / self.key / f"{part}.jsonl"
        write_text(path, "".join(json.dumps({"image_id": i, "caption": c}, ensure_ascii=False) + "\n"
                                 for i, c in captions.items()))
        return path

    def read(self) -> dict[str, str]:
        """Every caption the parts made with this key (none when no part ran)."""
        found: dict[str, str] = {}
        for path in sorted((self.folder / self.key).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    found[row["image_id"]] = row["caption"]
        return found

    def consume(self) -> None:
        """Delete the folder, every key's parts with it (older models' are of no further use)."""
        shutil.rmtree(self.folder, ignore_errors=True)

"""Embed every PNG of a folder into an embedding store; the subject of the SIGKILL test.

    python tests/jobs/embed_images.py IMAGES STORE [--shard-size N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipcap.pipeline.stages.embed import embed_missing
from clipcap.pipeline.embedding_store import EmbeddingStore
from clipcap.modeling.encoders import build_encoder

ENCODER = "efficientnet-lite0:random"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--shard-size", type=int, default=4)
    args = parser.parse_args()
    paths = sorted(str(p) for p in args.images.glob("*.png"))
    encoder = build_encoder(ENCODER)
    stats = embed_missing([Path(p).stem for p in paths], paths, encoder, EmbeddingStore(args.store, encoder.key),
                           batch_size=2, shard_size=args.shard_size)
    print(json.dumps(stats.__dict__))


if __name__ == "__main__":
    main()

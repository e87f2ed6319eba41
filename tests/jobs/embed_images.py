"""Embed every PNG of a folder into an embedding store; the subject of the SIGKILL test.

    python tests/jobs/embed_images.py IMAGES STORE [--shard-size N] [--kill-in-shard K]

``--kill-in-shard K`` SIGKILLs the process while it writes shard K (counting from 1): after the
shard's bytes are in its temporary file, before the rename that publishes it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from clipcap.pipeline.stages.embed import embed_missing
import clipcap.pipeline.embedding_store as embedding_store
from clipcap.pipeline.embedding_store import EmbeddingStore
from clipcap.modeling.encoders import build_encoder

ENCODER = "efficientnet-lite0:random"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--kill-in-shard", type=int, default=0)
    args = parser.parse_args()
    if args.kill_in_shard:
        save_file, written = embedding_store.save_file, []

        def save_then_die(tensors, path, metadata=None):
            save_file(tensors, path, metadata=metadata)
            written.append(path)
            if len(written) == args.kill_in_shard:
                os.kill(os.getpid(), signal.SIGKILL)

        embedding_store.save_file = save_then_die
    paths = sorted(str(p) for p in args.images.glob("*.png"))
    encoder = build_encoder(ENCODER)
    stats = embed_missing([Path(p).stem for p in paths], paths, encoder, EmbeddingStore(args.store, encoder.key),
                           batch_size=2, shard_size=args.shard_size)
    print(json.dumps(stats.__dict__))


if __name__ == "__main__":
    main()

"""Train a tiny ClipCap on synthetic pairs; the subject of the resume and torchrun tests.

    python tests/jobs/train_tiny.py OUT [--resume] [--kill-at-step N]
    python -m torch.distributed.run --nproc_per_node 2 tests/jobs/train_tiny.py OUT

Writes OUT/final-rank<r>.safetensors (every weight, LM included) and OUT/history-rank<r>.json;
checkpoints go to OUT/checkpoints. ``--kill-at-step N`` SIGKILLs the process right after
optimizer step N, as an out-of-memory killer or a pre-empted machine would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for helpers.py's tiny models

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from helpers import EOS, TINY_VOCAB, tiny_clipcap  # noqa: E402
from clipcap.training.batches import CaptionPairs  # noqa: E402
from clipcap.config import TrainConfig  # noqa: E402
from clipcap.training.distributed import current_context  # noqa: E402
from clipcap.training.loop import train_model  # noqa: E402


def synthetic_pairs(count: int, seed: int) -> CaptionPairs:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(count, 16, generator=generator)
    lengths = torch.randint(2, 9, (count,), generator=generator).tolist()
    captions = [torch.randint(2, TINY_VOCAB, (n,), generator=generator).tolist() + [EOS] for n in lengths]
    return CaptionPairs(embeddings, list(range(count)), captions)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # a fine-tuned GPT-2 with dropout 0.1: the RNG state matters for an exact resume
    model = tiny_clipcap("mlp", finetune_lm=True)
    cfg = TrainConfig(seed=0, epochs=3, batch_size=2, grad_accum_steps=2, lr=1e-3, warmup_steps=3,
                      checkpoint_every=2, early_stopping_patience=5, device="cpu")

    def on_step(record: dict) -> None:
        if record["step"] == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    history = train_model(model, synthetic_pairs(37, 1), synthetic_pairs(8, 2), cfg, pad_token_id=0, on_step=on_step,
                          checkpoint_dir=args.out / "checkpoints", resume=args.resume, fingerprint="tiny")
    rank = current_context().rank
    save_file({k: v.contiguous() for k, v in model.weights(include_lm=True).items()
               if k != "lm.lm_head.weight"}, str(args.out / f"final-rank{rank}.safetensors"))
    (args.out / f"history-rank{rank}.json").write_text(json.dumps(asdict(history)))


if __name__ == "__main__":
    main()

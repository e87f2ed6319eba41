"""Train a tiny ClipCap on synthetic pairs; the subject of the resume and torchrun tests.

    python tests/jobs/train_tiny.py OUT [--resume] [--kill-at-step N] [--kill-in-checkpoint-write N]
                                        [--early-stopping]
    python -m torch.distributed.run --nproc_per_node 2 tests/jobs/train_tiny.py OUT [...]

Writes, per rank r, OUT/final-rank<r>.safetensors (every weight, LM included),
OUT/history-rank<r>.json (the trainer's history: restored from the checkpoint on resume) and
OUT/work-rank<r>.json: what THIS process executed, counted by hooks outside the trainer -
``optimizer_steps`` (optimizer.step() calls), ``micro_batches`` (training forwards) and
``micro_batches_at_step`` (micro-batches done when each of its optimizer steps ended).
Checkpoints go to OUT/checkpoints.

``--kill-at-step N`` SIGKILLs every process right after its Nth optimizer step, as an
out-of-memory killer or a pre-empted machine would. ``--kill-in-checkpoint-write N`` SIGKILLs the
process inside the write of checkpoint N, once its tensors file is on disk and before the
checkpoint is complete. ``--early-stopping`` trains until the validation loss has not improved
for 2 epochs (the captions are random: memorising them soon hurts the validation loss).
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
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import clipcap.training.checkpoints as checkpoints  # noqa: E402
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


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_inside_checkpoint_write(step: int) -> None:
    """Die right after the tensors file of checkpoint ``step`` is written, before it is complete."""
    real_save_file = checkpoints.save_file

    def save_file_then_die(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        path = Path(filename)
        if path.name == checkpoints.TENSORS and f"step-{step:08d}" in path.parent.name:
            die()

    checkpoints.save_file = save_file_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--kill-in-checkpoint-write", type=int, default=0)
    parser.add_argument("--early-stopping", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # a fine-tuned GPT-2 with dropout 0.1: the RNG state matters for an exact resume
    model = tiny_clipcap("mlp", finetune_lm=True)
    if args.early_stopping:
        cfg = TrainConfig(seed=0, epochs=30, batch_size=2, grad_accum_steps=2, lr=1e-2, warmup_steps=3,
                          early_stopping_patience=2, device="cpu")
    else:
        cfg = TrainConfig(seed=0, epochs=3, batch_size=2, grad_accum_steps=2, lr=1e-3, warmup_steps=3,
                          checkpoint_every=2, early_stopping_patience=5, device="cpu")

    work = {"optimizer_steps": 0, "micro_batches": 0, "micro_batches_at_step": []}

    def count_micro_batch(module, inputs) -> None:
        if module.training:  # validation forwards run in eval mode
            work["micro_batches"] += 1

    def count_step(optimizer, args_, kwargs) -> None:
        work["optimizer_steps"] += 1
        work["micro_batches_at_step"].append(work["micro_batches"])
        if work["optimizer_steps"] == args.kill_at_step:
            die()

    model.register_forward_pre_hook(count_micro_batch)
    register_optimizer_step_post_hook(count_step)
    if args.kill_in_checkpoint_write:
        kill_inside_checkpoint_write(args.kill_in_checkpoint_write)

    history = train_model(model, synthetic_pairs(37, 1), synthetic_pairs(8, 2), cfg, pad_token_id=0,
                          checkpoint_dir=args.out / "checkpoints", resume=args.resume,
                          fingerprint=json.dumps(asdict(cfg)))  # resuming with other settings fails
    rank = current_context().rank
    save_file({k: v.contiguous() for k, v in model.weights(include_lm=True).items()
               if k != "lm.lm_head.weight"}, str(args.out / f"final-rank{rank}.safetensors"))
    (args.out / f"history-rank{rank}.json").write_text(json.dumps(asdict(history)))
    (args.out / f"work-rank{rank}.json").write_text(json.dumps(work))


if __name__ == "__main__":
    main()

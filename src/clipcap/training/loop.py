"""The training loop.

AdamW (fused), linear warm-up then linear decay, gradient clipping and
accumulation, validation loss each epoch with optional early stopping, bf16 autocast on CUDA,
optional ``torch.compile``, data-parallel under ``torchrun`` (rank 0 logs and saves), and
checkpoints from which a killed run resumes to the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from clipcap.training.batches import CaptionPairs, LengthGroupedBatches, PadCollator
from clipcap.training.checkpoints import (Checkpoint, latest_checkpoint, load_checkpoint, remove_checkpoints, restore_rng,
                                rng_state, save_checkpoint)
from clipcap.config import TrainConfig
from clipcap.environment import resolve_device
from clipcap.training.distributed import DistContext, current_context, init_distributed
from clipcap.errors import ClipcapError
from clipcap.modeling.model import ClipCap

log = logging.getLogger(__name__)
COMPILE_PAD_MULTIPLE = 8


@dataclass
class TrainHistory:
    steps: list[dict] = field(default_factory=list)  # one record per optimizer step
    epochs: list[dict] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class Progress:
    """Where the run is: restored from a checkpoint on resume."""

    step: int = 0             # optimizer steps done
    epoch: int = 0            # epochs completed
    batch_in_epoch: int = 0   # micro-batches of the current epoch done (this process)
    best_val: float = math.inf
    bad_epochs: int = 0


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the weight matrices only (as nanoGPT); biases, norm
    gains, token/position embeddings and the mapper's learned prefix constants are not decayed
    (decaying the final LayerNorm gain would pull the prefix away from the LM's token scale)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        constant = name.rsplit(".", 1)[-1] == "prefix_const"
        matrix = param.ndim >= 2 and id(param) not in embeddings and not constant
        (decay if matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = decay_groups(model, cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # the fused kernel (CUDA and CPU): one pass over all parameters instead of one op per tensor
    fused = device.type in ("cuda", "cpu") and all(p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)


@torch.no_grad()
def mean_loss(model: ClipCap, loader: DataLoader, device: torch.device, context: DistContext = DistContext(),
              bf16: bool = False) -> float:
    """Token-weighted mean loss over ``loader`` (summed over all processes)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        tokens = int(batch.attention_mask.sum())
        with _autocast(bf16, device):
            total += float(model(**batch.model_inputs())) * tokens
        count += tokens
    total, count = context.sum([total, count])
    return total / max(count, 1)


class Trainer:
    """One training run of ``model`` on ``pairs``; :meth:`fit` runs it (or finishes it on resume)."""

    def __init__(self, model: ClipCap, train_pairs: CaptionPairs, val_pairs: CaptionPairs | None, cfg: TrainConfig,
                 pad_token_id: int, checkpoint_dir: str | Path | None = None, fingerprint: str = "") -> None:
        self.cfg, self.fingerprint = cfg, fingerprint
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = resolve_device(cfg.device, current_context().local_rank)
        self.context = init_distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        self.bf16 = use_bf16(cfg, self.device)
        # compiled: lengths padded to multiples of 8 and static shapes, a handful of graphs (inductor's
        # dynamic-shape backward of the tuned LM failed at run time on CUDA, torch 2.11)
        collate = PadCollator(pad_token_id, multiple=COMPILE_PAD_MULTIPLE if cfg.compile else 1)
        self.batches = LengthGroupedBatches(train_pairs.lengths(), cfg.batch_size, seed=cfg.seed,
                                            rank=self.context.rank, world_size=self.context.world_size)
        if len(self.batches) == 0:
            raise ClipcapError(f"{len(train_pairs)} training captions make no batch of {cfg.batch_size} per "
                               f"process for {self.context.world_size} processes: lower train.batch_size")
        cuda = self.device.type == "cuda"  # there one worker process pads the next batch while one trains
        # a private generator: the loader must not draw from the global RNG (dropout's), or a
        # resumed run would see different dropout masks than an uninterrupted one
        self.loader = DataLoader(train_pairs, batch_sampler=self.batches, collate_fn=collate,
                                 generator=torch.Generator(), pin_memory=cuda, num_workers=int(cuda),
                                 persistent_workers=cuda)
        self.val_loader = None
        if val_pairs is not None and len(val_pairs):
            sampler = (DistributedSampler(val_pairs, self.context.world_size, self.context.rank, shuffle=False)
                       if self.context.enabled else None)
            self.val_loader = DataLoader(val_pairs, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
        self.steps_per_epoch = math.ceil(len(self.batches) / cfg.grad_accum_steps)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.params = model.trainable_parameters()
        self.optimizer = _optimizer(model, cfg, self.device)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, min(cfg.warmup_steps, self.total_steps),
                                                         self.total_steps)
        self.ddp = (DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.context.enabled else None)
        forward = self.ddp or model
        self.forward = torch.compile(forward, dynamic=False) if cfg.compile else forward
        self.progress = Progress()
        self.history = TrainHistory()
        self.best_weights: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"step": self.progress.step, "progress": asdict(self.progress), "fingerprint": self.fingerprint,
                "world_size": self.context.world_size, "scheduler": self.scheduler.state_dict(),
                "history": asdict(self.history)}

    def save(self) -> None:
        if self.checkpoint_dir is None:
            return
        rng = self.context.gather(rng_state())  # each process draws its own dropout masks
        if self.context.is_main:
            checkpoint = Checkpoint(self.model.weights(), self.optimizer.state_dict(), rng, self._state(),
                                    best=self.best_weights)
            path = save_checkpoint(self.checkpoint_dir, checkpoint, keep=self.cfg.keep_checkpoints)
            log.debug("checkpoint %s", path)
        self.context.barrier()

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``checkpoint_dir``; False when there is none."""
        path = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        if path is None:
            log.info("no checkpoint in %s: training from the start", self.checkpoint_dir)
            return False
        checkpoint = load_checkpoint(path)
        state = checkpoint.state
        if state["fingerprint"] != self.fingerprint or state["world_size"] != self.context.world_size:
            raise ClipcapError(
                f"{path} was written by a run with other parameters, data or process count; resume needs the "
                f"same ones (or delete {self.checkpoint_dir} to start over)")
        if len(checkpoint.rng) != self.context.world_size:
            raise ClipcapError(f"{path} holds the RNG states of {len(checkpoint.rng)} of its "
                               f"{self.context.world_size} processes (an older format); delete "
                               f"{self.checkpoint_dir} to start over")
        self.best_weights = checkpoint.best or {}
        self.model.load_weights(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        self.history = TrainHistory(**state["history"])
        restore_rng(checkpoint.rng[self.context.rank])  # this process's own dropout stream
        log.info("resumed from %s (step %d of %d)", path, self.progress.step, self.total_steps)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, on_step: Callable[[dict], None] | None = None,
            on_epoch: Callable[[ClipCap], dict] | None = None,
            on_epoch_end: Callable[[dict], None] | None = None) -> TrainHistory:
        """Train to the end; ``on_step(record)`` after each optimizer step, ``on_epoch(model)`` after
        each epoch's validation (its dict joins the epoch record) and ``on_epoch_end(record)`` with the
        finished record run on the main process only."""
        cfg, progress, main = self.cfg, self.progress, self.context.is_main
        if main:
            log.info("parameters: %s", self.model.parameter_summary())
            log.info("%d optimizer steps (%d epochs x %d) of %d x %d captions x %d processes on %s%s%s",
                     self.total_steps, cfg.epochs, self.steps_per_epoch, cfg.batch_size, cfg.grad_accum_steps,
                     self.context.world_size, self.device, ", bf16 autocast" if self.bf16 else "",
                     ", torch.compile" if cfg.compile else "")
        bar = tqdm(total=self.total_steps, initial=progress.step, desc="train", unit="step", disable=not main)
        while progress.epoch < cfg.epochs and not self.history.stopped_early:
            self._run_epoch(bar, on_step)
            self._end_epoch(on_epoch)
            if on_epoch_end is not None and self.context.is_main:
                on_epoch_end(self.history.epochs[-1])
            self.save()
        bar.close()
        if self.best_weights and progress.bad_epochs:  # early stopping on: the model is the best epoch's
            self.model.load_weights(self.best_weights)
            log.info("restored the weights of the best epoch (val loss %.4f)", progress.best_val)
        self.model.eval()
        return self.history

    def _run_epoch(self, bar: tqdm, on_step: Callable[[dict], None] | None) -> None:
        cfg, progress = self.cfg, self.progress
        epoch_batches, accum = len(self.batches), cfg.grad_accum_steps
        self.batches.set_epoch(progress.epoch, skip=progress.batch_in_epoch)
        self.loader.dataset.set_epoch(progress.epoch)   # entity-aware prompts draw their entities per epoch
        self.model.train()
        step_loss = 0.0
        for batch in self.loader:
            micro = progress.batch_in_epoch
            group_start = micro - micro % accum
            group_size = min(accum, epoch_batches - group_start)  # the epoch's last step may be shorter
            last = micro + 1 == group_start + group_size
            batch = batch.to(self.device, non_blocking=True)
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with _autocast(self.bf16, self.device):
                    loss = self.forward(**batch.model_inputs()) / group_size
                loss.backward()
            step_loss += loss.detach()
            progress.batch_in_epoch += 1
            if not last:
                continue
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            value = self.context.sum([float(step_loss)])[0] / self.context.world_size
            step_loss = 0.0
            record = {"step": progress.step, "epoch": progress.epoch + 1, "loss": value,
                      "lr": self.scheduler.get_last_lr()[0]}
            self.history.steps.append(record)
            bar.update()
            bar.set_postfix(epoch=progress.epoch + 1, loss=f"{value:.3f}")
            if on_step is not None and self.context.is_main:
                on_step(record)
            if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and progress.batch_in_epoch < epoch_batches:
                self.save()

    def _end_epoch(self, on_epoch: Callable[[ClipCap], dict] | None = None) -> None:
        cfg, progress = self.cfg, self.progress
        progress.epoch += 1
        progress.batch_in_epoch = 0
        losses = [s["loss"] for s in self.history.steps if s["epoch"] == progress.epoch]
        record = {"epoch": progress.epoch, "train_loss": sum(losses) / max(len(losses), 1)}
        if self.val_loader is not None:
            record["val_loss"] = val = mean_loss(self.model, self.val_loader, self.device, self.context, self.bf16)
            if val < progress.best_val:
                progress.best_val, progress.bad_epochs = val, 0
                if cfg.early_stopping_patience:
                    self.best_weights = {k: v.clone() for k, v in self.model.weights().items()}
            else:
                progress.bad_epochs += 1
            if cfg.early_stopping_patience and progress.bad_epochs >= cfg.early_stopping_patience:
                self.history.stopped_early = True
                record["stopped_early"] = True
        if on_epoch is not None and self.context.is_main:
            record.update(on_epoch(self.model))
        record["step"] = progress.step
        self.history.epochs.append(record)
        if self.context.is_main:
            log.info("epoch %d: %s%s", progress.epoch, ", ".join(
                f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float)),
                f" (no better val loss for {progress.bad_epochs} epochs: stopping early)"
                if self.history.stopped_early else "")


def train_model(model: ClipCap, train_pairs: CaptionPairs, val_pairs: CaptionPairs | None, cfg: TrainConfig,
                pad_token_id: int, on_step: Callable[[dict], None] | None = None, *,
                checkpoint_dir: str | Path | None = None, resume: bool = False, fingerprint: str = "",
                on_epoch: Callable[[ClipCap], dict] | None = None,
                on_epoch_end: Callable[[dict], None] | None = None) -> TrainHistory:
    """Train ``model`` in place and return its loss history (the callbacks: :meth:`Trainer.fit`).

    With ``checkpoint_dir``, checkpoints are written every ``cfg.checkpoint_every`` steps and at
    each epoch end; ``resume=True`` continues from the newest one (whose ``fingerprint``, a digest
    of the params and data, must match) and ends with the weights an uninterrupted run would have.
    """
    # one dropout stream per process (a replica of rank 0's masks would add no variety), each
    # saved in the checkpoints and restored on resume
    torch.manual_seed(cfg.seed + current_context().rank)
    trainer = Trainer(model, train_pairs, val_pairs, cfg, pad_token_id, checkpoint_dir, fingerprint)
    if resume:
        trainer.resume()
    elif checkpoint_dir is not None and trainer.context.is_main and remove_checkpoints(checkpoint_dir):
        log.info("a fresh run: removed the checkpoints of an earlier run from %s", checkpoint_dir)
    return trainer.fit(on_step, on_epoch, on_epoch_end)

"""The training loop: AdamW, linear warm-up then linear decay, gradient clipping, per-step loss."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from clipcap.captions import CaptionPairs, LengthGroupedBatches, PadCollator
from clipcap.config import TrainConfig
from clipcap.model import ClipCap

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainHistory:
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)


@torch.no_grad()
def mean_loss(model: ClipCap, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        tokens = int(batch.attention_mask.sum())
        total += float(model(batch.embedding, batch.input_ids, batch.attention_mask)) * tokens
        count += tokens
    return total / max(count, 1)


def train_model(model: ClipCap, train_pairs: CaptionPairs, val_pairs: CaptionPairs | None, cfg: TrainConfig,
                pad_token_id: int, on_step: Callable[[dict], None] | None = None) -> TrainHistory:
    """Train ``model`` in place and return its loss history."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    collate = PadCollator(pad_token_id)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = LengthGroupedBatches(train_pairs.lengths(), cfg.batch_size, generator)
    loader = DataLoader(train_pairs, batch_sampler=batches, collate_fn=collate)
    val_loader = (DataLoader(val_pairs, batch_size=cfg.batch_size, collate_fn=collate)
                  if val_pairs is not None and len(val_pairs) else None)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(batches)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    log.info("training %s trainable parameters (%s total) on %d pairs for %d steps on %s",
             f"{sum(p.numel() for p in params):,}", f"{sum(p.numel() for p in model.parameters()):,}",
             len(train_pairs), total_steps, device)
    history = TrainHistory()
    step = 0
    bar = tqdm(total=total_steps, desc="train", unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        for batch in loader:
            batch = batch.to(device)
            loss = model(batch.embedding, batch.input_ids, batch.attention_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            record = {"step": step, "epoch": epoch + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            history.steps.append(record)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.3f}")
            if on_step is not None:
                on_step(record)
        epoch_record = {"epoch": epoch + 1, "train_loss": mean_of_epoch(history, epoch + 1)}
        if val_loader is not None:
            epoch_record["val_loss"] = mean_loss(model, val_loader, device)
        history.epochs.append(epoch_record)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in epoch_record.items() if k != "epoch"))
    bar.close()
    model.eval()
    return history


def mean_of_epoch(history: TrainHistory, epoch: int) -> float:
    losses = [s["loss"] for s in history.steps if s["epoch"] == epoch]
    return sum(losses) / max(len(losses), 1)

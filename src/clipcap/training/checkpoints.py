"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``step-00000123/`` holding ``tensors.safetensors`` (model, optimizer
state, the RNG states of every process), ``best.safetensors`` when early stopping keeps the best
epoch's weights, and ``state.json`` (step, epoch, position in the epoch, scheduler, history).
It is written under a temporary name and renamed into place, so a run killed at any moment
leaves either the previous checkpoints or the new one complete - never a half-written one.
No pickle: both files load without executing code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipcap.errors import ClipcapError
from clipcap.fileio import read_json, write_json

log = logging.getLogger(__name__)

TENSORS, BEST, STATE = "tensors.safetensors", "best.safetensors", "state.json"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    model: dict[str, torch.Tensor]          # what ClipCap.weights() returns
    optimizer: dict[str, Any]
    rng: list[dict[str, torch.Tensor]]      # each process's RNG states (rng_state()), by rank
    state: dict[str, Any]                   # JSON-serialisable: step, epoch, scheduler, history...
    best: dict[str, torch.Tensor] | None = None  # the best epoch's weights (early stopping), if kept


def _flatten_optimizer(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states (dropout draws from them): ``cpu`` and ``cuda.<device>``."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Set this process's RNG states to what :func:`rng_state` returned."""
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in states))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _flatten_rng(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"rng.{rank}.{name}": value for rank, rank_states in enumerate(states)
            for name, value in rank_states.items()}


def _unflatten_rng(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        rest = key.removeprefix("rng.")
        rank, _, name = rest.partition(".")
        if not rank.isdigit():  # "rng.cpu": written before every process's state was saved, rank 0's
            rank, name = "0", rest
        by_rank.setdefault(int(rank), {})[name] = value
    return [by_rank[rank] for rank in sorted(by_rank)]


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write ``checkpoint`` atomically as ``directory/step-<step>`` and keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(checkpoint.state["step"])
    target = directory / f"step-{step:08d}"
    staging = directory / f".step-{step:08d}.partial"
    for leftover in directory.glob(".step-*.partial"):  # what a process killed while writing left
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    optim_tensors, optim_meta = _flatten_optimizer(checkpoint.optimizer)
    tensors = {**{f"model.{k}": v for k, v in checkpoint.model.items()}, **optim_tensors,
               **_flatten_rng(checkpoint.rng)}
    save_file(tensors, str(staging / TENSORS))
    if checkpoint.best:
        save_file(checkpoint.best, str(staging / BEST))
    write_json(staging / STATE, {**checkpoint.state, "optimizer": optim_meta})
    for path in staging.iterdir():  # durable before it becomes visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.partial`` folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        tensors = load_file(str(path / TENSORS))
        best = load_file(str(path / BEST)) if (path / BEST).exists() else None
        state = read_json(path / STATE)
    except (OSError, ValueError) as err:
        raise ClipcapError(f"{path}: unreadable checkpoint ({err}); delete it to resume from an older one") from err
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = _unflatten_rng({k: v for k, v in tensors.items() if k.startswith("rng.")})
    optimizer = _unflatten_optimizer(optim, state.pop("optimizer"))
    return Checkpoint(model, optimizer, rng, state, best)


def remove_checkpoints(directory: str | Path) -> int:
    """Delete every checkpoint (complete or half-written) in ``directory``; returns how many."""
    directory = Path(directory)
    found = [p for p in directory.iterdir() if p.is_dir() and "step-" in p.name] if directory.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None

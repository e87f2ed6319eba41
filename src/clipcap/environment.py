"""Process-wide settings: the offline environment, the cache folder, the compute device.

The offline settings live in ``offline.env`` beside this file, the one list that
``scripts/env.sh`` exports too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OFFLINE_ENV_FILE = Path(__file__).with_name("offline.env")


def offline_env() -> dict[str, str]:
    """The ``KEY=VALUE`` lines of ``offline.env``."""
    lines = (line.strip() for line in OFFLINE_ENV_FILE.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def apply_offline_env() -> None:
    """Set the offline defaults without overriding what the user set explicitly."""
    for key, value in offline_env().items():
        os.environ.setdefault(key, value)


def cache_dir() -> Path:
    """Where converted model weights live (outside git): ``$CLIPCAP_CACHE`` or ``~/.cache/clipcap``."""
    root = os.environ.get("CLIPCAP_CACHE") or Path.home() / ".cache" / "clipcap"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` = the GPU when there is one (``cuda:local_rank``), else the CPU; ``cuda`` = ``cuda:local_rank``."""
    import torch  # here, not at the top: the CLI imports this module before it knows it needs torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device

"""Process-wide settings that keep every tool offline and quiet.

No model hub or telemetry endpoint is reachable on the machines clipcap runs on by
default; without these settings a weight request hangs for ~47 s before failing.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Set the offline defaults without overriding what the user set explicitly."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def cache_dir() -> Path:
    """Where converted model weights live (outside git): ``$CLIPCAP_CACHE`` or ``~/.cache/clipcap``."""
    root = os.environ.get("CLIPCAP_CACHE") or Path.home() / ".cache" / "clipcap"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path

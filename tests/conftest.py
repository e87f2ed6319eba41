"""Shared fixtures. Offline settings are applied before anything imports transformers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="clipcap-prefect-"))
# subprocesses (jobs, torchrun, dvc) import this clone's code too, whatever the venv has installed
_ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join([str(_ROOT / "src"), str(_ROOT / "tests"),
                                            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture
def make_image(tmp_path):
    """Write a small real PNG and return its path."""

    def make(name: str, color=(200, 30, 30), size=(32, 24), mode="RGB"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color).save(path)
        return path

    return make

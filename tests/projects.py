"""Small real clipcap projects for the pipeline and scenario tests: this clone's pipeline and code,
tiny params, Tux Paint stamps as data."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAMPS = Path("/usr/share/tuxpaint/stamps")

TINY_PARAMS = {
    "dataset": {"limit": 40},
    "split": {"test_fraction": 0.25, "val_fraction": 0.1},
    "encoder": {"batch_size": 16, "num_workers": 0},
    "lm": {"name": "tiny-gpt2", "tokenizer": "smollm2-135m"},
    "mapper": {"prefix_length": 4, "clip_length": 4, "num_layers": 1, "num_heads": 2},
    "retrieval": {"k": 2},   # the retrieval-augmented model: its datastore travels with the registered model
    "train": {"epochs": 3, "batch_size": 8, "lr": 0.001, "warmup_steps": 2, "early_stopping_patience": 0},
    "evaluate": {"decoding": {"num_beams": 2, "max_new_tokens": 8}, "num_samples": 5},
}

# twelve stamps from four categories: a user's own folder dataset
MINE = ["food/fruit/cartoon/apple.png", "animals/insects/cartoon/dragonfly.png",
        "vehicles/masstransit/green_korean_bus.png", "sports/tennis_racket.png", "animals/marsupials/koala.png",
        "food/fruit/apple_sierra_beauty.png", "food/fruit/cartoon/lemon_slice.png", "food/fruit/avocado.png",
        "animals/fish/lobster.png", "vehicles/construction/cartoon/terex.png",
        "vehicles/construction/cartoon/cementMixer.png", "food/fruit/orange_seville.png"]
MINE_OVERRIDES = {"dataset": {"source": "folder", "root": "photos", "limit": None},
                  "split": {"test_fraction": 0.4, "val_fraction": 0.15}}


def run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def captioned_folder(folder: Path, stamps: list[str]) -> Path:
    """Copy Tux Paint ``stamps`` (paths under the stamps folder) into ``folder`` with a captions.jsonl."""
    folder.mkdir(parents=True)
    rows = []
    for relative in stamps:
        source = STAMPS / relative
        shutil.copy(source, folder / source.name)
        rows.append(json.dumps({"image": source.name, "caption": source.with_suffix(".txt").read_text().splitlines()[0]}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def new_project(project: Path, datasets: dict, shared: dict | None = None) -> Path:
    """A git + DVC project at ``project``: this repo's dvc.yaml, code and stage scripts, params.yaml with
    ``shared`` (default ``TINY_PARAMS``; ``{}``: the repo's own) and ``datasets``, ``data/`` tracked by
    ``data.dvc`` (fill ``data/`` before calling)."""
    project.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scripts" / "bin", project / "scripts" / "bin")  # what dvc.yaml's stages run
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in (TINY_PARAMS if shared is None else shared).items():
        params[section].update(values)
    params["datasets"] = datasets
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for dataset in datasets:
        (project / "data" / dataset).mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "add", "-q", "data"], project)
    return project

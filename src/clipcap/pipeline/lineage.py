"""Where a registered captioner came from: the code (git commit, and whether the work tree had
uncommitted changes), the pipeline (each of its dataset's stages in ``dvc.lock``: the hashes of what
they read and wrote) and the data (a digest of the clean manifest, the images and captions trained on).
The register stage tags the MLflow run with these and logs the manifest as the run's dataset input.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pandas as pd
import yaml

COMMIT_TAG, DIRTY_TAG, DATA_TAG, LOCK_TAG = "clipcap.git_commit", "clipcap.git_dirty", "clipcap.data", "clipcap.dvc_lock"


def git_state(project: Path = Path(".")) -> tuple[str, bool] | None:
    """(HEAD commit, whether tracked files differ from it), or None outside a git work tree."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True)
    if head.returncode != 0:
        return None
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                            capture_output=True, text=True)
    return head.stdout.strip(), bool(status.stdout.strip())


def lock_entries(dataset: str, lock: Path = Path("dvc.lock")) -> dict:
    """This dataset's stages as ``dvc.lock`` records them (``fetch@<dataset>``...), {} without a lock file."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: entry for name, entry in stages.items() if name.endswith(f"@{dataset}")}


def data_digest(manifest: pd.DataFrame) -> str:
    """sha256 of the clean manifest's images (ids), captions and splits, whatever the row order."""
    rows = sorted(json.dumps([r.image_id, list(r.captions), r.split]) for r in manifest.itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def lineage_tags(dataset: str, manifest: pd.DataFrame, project: Path = Path(".")) -> dict[str, str]:
    """The run tags: commit and dirty flag, the data digest, a digest of the dataset's dvc.lock entries
    and each stage's output hashes (``clipcap.dvc.<stage>``)."""
    tags = {DATA_TAG: data_digest(manifest)}
    state = git_state(project)
    if state is not None:
        tags[COMMIT_TAG], tags[DIRTY_TAG] = state[0], str(state[1]).lower()
    entries = lock_entries(dataset, project / "dvc.lock")
    if entries:
        tags[LOCK_TAG] = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
        for stage, entry in entries.items():
            outs = {o["path"]: o.get("md5") for o in entry.get("outs", [])}
            tags[f"clipcap.dvc.{stage.split('@')[0]}"] = json.dumps(outs, sort_keys=True)[:5000]
    return tags

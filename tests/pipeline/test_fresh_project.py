"""A fresh project after `bash scripts/run.sh` (no batches of its own yet): a DVC experiment runs and moves no
alias, and a repaired embedding shard that re-encodes to the same vectors retrains nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from projects import ROOT, new_project, run

pytestmark = pytest.mark.pipeline

TUXPAINT = Path("artifacts") / "tuxpaint"
# run.sh sources scripts/env.sh (offline settings, the venv, a DVC remote): this process has them; the stub
# only puts the project's own code first, as env.sh does
ENV_STUB = 'export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"\nexport PATH="$PWD/scripts/bin:$PATH"\n'


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A committed project whose data/tuxpaint/ is empty, as a clone is, after `bash scripts/run.sh`."""
    project = new_project(tmp_path_factory.mktemp("fresh"), {"tuxpaint": {}})
    shutil.copy(ROOT / "scripts" / "run.sh", project / "scripts" / "run.sh")
    (project / "scripts" / "env.sh").write_text(ENV_STUB)
    for command in (["dvc", "remote", "add", "-q", "-d", "local", str(project.parent / "remote")],
                    ["git", "config", "user.email", "tests@clipcap"], ["git", "config", "user.name", "tests"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "a fresh project"]):
        run(command, project)
    run(["bash", "scripts/run.sh"], project)
    return project


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


def _stages_to_rerun(project: Path) -> list[str]:
    done = subprocess.run(["dvc", "status", "--json"], cwd=project, capture_output=True, text=True, check=True)
    return sorted(stage for stage, why in json.loads(done.stdout).items() if why != ["always changed"])


def test_dvc_exp_run_after_run_sh_registers_and_moves_no_alias(fresh):
    """`dvc exp run` first checks data.dvc out, which removed the empty data/tuxpaint/ that fetch depends on
    ("dependency 'data/tuxpaint' does not exist"); the folder now holds a README that data.dvc records. Outside
    an experiment, register.min_delta=-1000 would promote any version."""
    client = MlflowClient(f"sqlite:///{fresh / 'mlflow.db'}")
    before = {a: client.get_model_version_by_alias("clipcap-tuxpaint", a).version for a in ("champion", "challenger")}
    out = run(["dvc", "exp", "run", "-S", "train.epochs=1", "-S", "register.min_delta=-1000"], fresh)
    assert _ran(out) == ["fetch@tuxpaint", "train@tuxpaint", "evaluate@tuxpaint", "register@tuxpaint"], out
    found = json.loads((fresh / TUXPAINT / "registered.json").read_text())
    assert found["experiment"] and found["promoted_to_champion"] is False and found["version"] == 2, found
    assert found["gate"].startswith(f"DVC experiment {found['experiment']}: registered without moving an alias")
    assert {a: client.get_model_version_by_alias("clipcap-tuxpaint", a).version
            for a in ("champion", "challenger")} == before
    assert (fresh / "data" / "tuxpaint").is_dir()
    assert _ran(run(["dvc", "repro"], fresh)) == ["fetch@tuxpaint"]  # plain repro still works, nothing to redo


def test_a_repaired_shard_with_the_same_vectors_retrains_nothing(fresh):
    """A truncated shard is set aside and its images encoded again, into a new shard file (another hash of the
    store folder); the vectors are the same bytes, so vectors.json, what train depends on, is unchanged."""
    store = fresh / TUXPAINT / "embeddings"
    vectors = (fresh / TUXPAINT / "vectors.json").read_text()
    shard = sorted(store.rglob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = run(["dvc", "repro"], fresh)
    assert (shard.parent / "damaged" / shard.name).exists()
    assert _ran(out) == ["fetch@tuxpaint", "embed@tuxpaint"], out
    assert (fresh / TUXPAINT / "vectors.json").read_text() == vectors
    assert _stages_to_rerun(fresh) == []

"""dvc.yaml's code dependencies are exactly the code each stage's command runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from architecture import SRC, closure, files_of, package_files

from clipcap.pipeline import STAGES
from clipcap.pipeline.registry import INFERENCE_CODE

ROOT = SRC.parent
STAGE_LOOPS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
DVC = {name: loop["do"] for name, loop in STAGE_LOOPS.items()}  # each stage's body, run once per dataset
PER_DATASET = "${key}"


def declared_code(stage: str) -> set[Path]:
    """The package files a stage's deps cover (a folder covers every file under it)."""
    code = package_files()
    out = set()
    for dep in DVC[stage]["deps"]:
        path = Path(dep)
        out |= {f for f in code if f == path or path in f.parents}
    return out


def run_code(stage: str) -> set[Path]:
    files = files_of(closure("clipcap.cli", f"clipcap.pipeline.stages.{stage}"))
    if stage == "register":  # the registered model ships the inference code and the pyfunc entry point
        shipped = {f for f in package_files() if f.relative_to("src/clipcap").parts[0] in INFERENCE_CODE}
        files |= shipped | {Path("src/clipcap/pipeline/pyfunc.py")}
    return files


def test_stages_are_the_pipeline_stages_in_order_once_per_dataset():
    assert tuple(DVC) == STAGES
    assert all(loop["foreach"] == "${datasets}" for loop in STAGE_LOOPS.values())
    # by path: a stage runs this clone's code (the code DVC hashes), whatever is first on PATH
    assert all(DVC[s]["cmd"].split()[:4] == ["scripts/bin/clipcap", "--dataset", PER_DATASET, s] for s in STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_each_dataset_has_its_own_outputs_batches_and_overrides(stage):
    body = DVC[stage]
    outputs = [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots")
               for o in body.get(key, [])]
    assert outputs and all(o.startswith(f"artifacts/{PER_DATASET}/") for o in outputs)
    artifacts = [d for d in body["deps"] if d.startswith("artifacts")]
    assert all(d.startswith(f"artifacts/{PER_DATASET}/") for d in artifacts)
    assert [d for d in body["deps"] if d.startswith("data")] in ([], [f"data/{PER_DATASET}"])
    assert f"datasets.{PER_DATASET}" in body["params"]


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_what_the_stage_runs(stage):
    declared, needed = declared_code(stage), run_code(stage)
    assert not needed - declared, f"dvc.yaml stage {stage} misses deps it runs: {sorted(map(str, needed - declared))}"
    assert not declared - needed, f"dvc.yaml stage {stage} lists code it never runs: {sorted(map(str, declared - needed))}"


def test_every_dep_exists_or_is_an_output_of_an_earlier_stage():
    outputs: set[str] = set()
    for stage in STAGES:
        for dep in DVC[stage]["deps"]:
            assert (ROOT / dep).exists() or dep in outputs or dep == "data/${key}", f"{stage}: {dep} comes from nowhere"
        for key in ("outs", "metrics", "plots"):
            for out in DVC[stage].get(key, []):
                outputs.add(next(iter(out)) if isinstance(out, dict) else out)


def test_params_name_config_sections():
    from clipcap.config import Config, config_to_dict

    known = config_to_dict(Config())
    for stage in STAGES:
        for param in DVC[stage].get("params", []):
            if param == f"datasets.{PER_DATASET}":
                continue
            node = known
            for part in param.split("."):
                assert part in node, f"{stage}: params entry {param} is not a params.yaml key"
                node = node[part]


def test_dvc_itself_accepts_dvc_yaml(tmp_path):
    """DVC's own schema check (a stage-level plot with several y columns, for one, is refused)."""
    import shutil
    import subprocess

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    done = subprocess.run(["dvc", "stage", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    datasets = list(yaml.safe_load((ROOT / "params.yaml").read_text())["datasets"])
    assert datasets[0] == "tuxpaint"
    assert [line.split()[0] for line in done.stdout.splitlines()] == [f"{s}@{d}" for s in STAGES for d in datasets]


def test_the_stages_after_embed_depend_on_the_vectors_digest_not_the_store_folder():
    """A damaged shard set aside and re-encoded is a new file (a new hash of the store folder) holding the same
    vectors: the stages that read them depend on embed's digest of them, so such a repair re-runs nothing."""
    store, digest = f"artifacts/{PER_DATASET}/embeddings", f"artifacts/{PER_DATASET}/vectors.json"
    assert digest in DVC["embed"]["outs"]
    readers = [stage for stage in STAGES if store in DVC[stage]["deps"] or digest in DVC[stage]["deps"]]
    assert readers == ["train", "evaluate", "register"]
    assert all(store not in DVC[stage]["deps"] for stage in readers)

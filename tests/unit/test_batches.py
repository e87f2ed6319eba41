"""`clipcap add-batch`: a batch is checked like the validate stage checks it, added whole or not at all,
and recorded with DVC in a DVC project (a real `dvc init` repository)."""

from __future__ import annotations

import json
import subprocess

import pytest

from clipcap.cli import main
from clipcap.config import Config, config_from_dict
from clipcap.errors import ClipcapError
from clipcap.pipeline.batches import add_batch, dataset_resource


def _batch(folder, make_image, rows: list[dict]):
    for row in rows:
        if row.get("image") and not row.get("missing"):
            make_image(f"{folder.name}/{row['image']}", color=(len(row["image"]) * 20 % 255, 90, 10))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "missing"}) + "\n"
                                                   for r in rows))
    return folder


@pytest.fixture
def cfg() -> Config:
    return config_from_dict({"datasets": {"mine": {"dataset": {"source": "folder", "root": "photos"}}}}, "mine")


def test_a_good_batch_is_copied_whole_under_data(tmp_path, make_image, cfg, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    folder = _batch(tmp_path / "new", make_image, [{"image": "a.png", "caption": "A red ball."},
                                                    {"image": "bb.png", "caption": "A green hat."}])
    project = tmp_path / "project"
    project.mkdir()
    added = add_batch(cfg, folder, project)
    assert (added.name, added.images, added.tracked, added.announced) == ("new", 2, False, False)
    assert sorted(p.name for p in (project / "data" / "mine" / "new").iterdir()) == ["a.png", "bb.png", "captions.jsonl"]
    assert not list((project / "data" / "mine").glob(".*partial"))
    with pytest.raises(ClipcapError, match="already exists"):
        add_batch(cfg, folder, project)


def test_a_bad_batch_is_refused_naming_its_rows_and_nothing_is_copied(tmp_path, make_image, cfg):
    folder = _batch(tmp_path / "bad", make_image, [{"image": "a.png", "caption": "A red ball."},
                                                    {"image": "gone.png", "caption": "A hat.", "missing": True}])
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(ClipcapError) as err:
        add_batch(cfg, folder, project)
    assert "captions.jsonl:2" in str(err.value) and "missing_file" in str(err.value)
    assert "nothing was added" in str(err.value)
    assert not (project / "data").exists()


def test_in_a_dvc_project_the_batch_is_recorded_in_data_dvc(tmp_path, make_image, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    project = tmp_path / "project"
    (project / "data" / "tuxpaint").mkdir(parents=True)
    (project / "params.yaml").write_text("datasets: {tuxpaint: {}}\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    before = (project / "data.dvc").read_text()
    folder = _batch(tmp_path / "b1", make_image, [{"image": "a.png", "caption": "A red ball."}])
    monkeypatch.chdir(project)
    assert main(["add-batch", "tuxpaint", str(folder)]) == 0
    after = (project / "data.dvc").read_text()
    assert after != before and "nfiles: 2" in after  # the image and its captions file
    status = subprocess.run(["dvc", "status", "data.dvc"], cwd=project, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout.lower() or not status.stdout.strip()


def test_the_event_names_the_dataset_resource():
    assert dataset_resource("tuxpaint") == "clipcap.dataset.tuxpaint"

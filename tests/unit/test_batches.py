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


# ---------------------------------------------------------------- links, Unicode, the dataset's own checks
def _existing_batch(project):
    """A batch already under data/: a refused batch must leave it exactly as it was."""
    old = project / "data" / "mine" / "old"
    old.mkdir(parents=True)
    (old / "captions.jsonl").write_text('{"image": "x.png", "caption": "An old one."}\n')
    return old, (old / "captions.jsonl").read_bytes()


def _untouched(project, old, before):
    assert sorted(p.name for p in (project / "data" / "mine").iterdir()) == ["old"]  # no new batch, no .partial
    assert [p.name for p in old.iterdir()] == ["captions.jsonl"] and (old / "captions.jsonl").read_bytes() == before


@pytest.mark.parametrize("item", ["secret.txt", "captions.jsonl"])
def test_a_link_out_of_the_folder_is_refused_by_name_and_nothing_is_copied(tmp_path, make_image, cfg, item):
    folder = _batch(tmp_path / "new", make_image, [{"image": "a.png", "caption": "A red ball."}])
    outside = tmp_path / "outside.txt"
    outside.write_text((folder / "captions.jsonl").read_text() if item == "captions.jsonl" else "root:x:0:0\n")
    (folder / item).unlink(missing_ok=True)
    (folder / item).symlink_to(outside)
    project = tmp_path / "project"
    old, before = _existing_batch(project)
    with pytest.raises(ClipcapError) as err:
        add_batch(cfg, folder, project)
    assert str(err.value) == (f"new/{item}: a symbolic link to {outside}, outside the batch folder; copy the file in "
                              "instead (nothing was added)")
    _untouched(project, old, before)


def test_loops_links_to_folders_and_special_files_are_refused_each_named(tmp_path, make_image, cfg):
    import os

    folder = _batch(tmp_path / "new", make_image, [{"image": "a.png", "caption": "A red ball."}])
    (folder / "loop1").symlink_to("loop2")
    (folder / "loop2").symlink_to("loop1")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")     # a folder link inside: copying it would loop
    (folder / "gone.png").symlink_to("nowhere.png")
    os.mkfifo(folder / "pipe")                    # copying a FIFO would block or fail
    project = tmp_path / "project"
    old, before = _existing_batch(project)
    with pytest.raises(ClipcapError) as err:
        add_batch(cfg, folder, project)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{folder}: 5 items cannot be added (nothing was added):"
    assert lines[1:] == [
        "  new/gone.png: a symbolic link to nowhere.png, which does not exist; remove it or copy the file in instead",
        "  new/loop1: a symbolic link to loop2 that loops back on itself; replace it with the file it should name",
        "  new/loop2: a symbolic link to loop1 that loops back on itself; replace it with the file it should name",
        "  new/pipe: not a regular file (a FIFO, socket or device); remove it",
        "  new/sub/up: a symbolic link to the folder ..; copy the files in instead (or remove the link)"]
    _untouched(project, old, before)


def test_a_link_to_a_file_inside_the_folder_is_copied_as_that_file(tmp_path, make_image, cfg, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    folder = _batch(tmp_path / "new", make_image, [{"image": "a.png", "caption": "A red ball."},
                                                    {"image": "pics/same.png", "caption": "The red ball again.",
                                                     "missing": True}])
    (folder / "pics").mkdir()
    (folder / "pics" / "same.png").symlink_to("../a.png")
    project = tmp_path / "project"
    added = add_batch(cfg, folder, project)
    copied = added.path / "pics" / "same.png"
    assert not copied.is_symlink() and copied.read_bytes() == (folder / "a.png").read_bytes()
    assert added.images == 1 and not added.quarantined  # one picture, two captions


def test_a_caption_in_nfc_and_in_nfd_is_one_caption(tmp_path, make_image, monkeypatch):
    import unicodedata

    from clipcap.pipeline.batches import check_batch

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    lenient = config_from_dict({"datasets": {"mine": {"dataset": {"source": "folder", "root": "photos"},
                                                      "validate": {"max_bad_fraction": 0.5}}}}, "mine")
    composed, decomposed = unicodedata.normalize("NFC", "Un café."), unicodedata.normalize("NFD", "Un café.")
    assert composed != decomposed
    folder = _batch(tmp_path / "new", make_image, [{"image": "a.png", "caption": composed},
                                                    {"image": "a.png", "caption": decomposed},
                                                    {"image": "bb.png", "caption": "A green hat."}])
    result = check_batch(folder, lenient)
    assert result.reason_counts == {"duplicate": 1}
    assert sorted(c for captions in result.manifest["captions"] for c in captions) == ["A green hat.", composed]


def test_the_batch_is_checked_with_the_datasets_own_validate_section(tmp_path, make_image, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    def config(validate: dict) -> Config:
        return config_from_dict({"datasets": {"mine": {"dataset": {"source": "folder", "root": "photos"},
                                                       "validate": validate}}}, "mine")

    long = _batch(tmp_path / "long", make_image, [{"image": "a.png", "caption": "A red ball on a lawn."},
                                                   {"image": "bb.png", "caption": "A green hat on a hook."}])
    with pytest.raises(ClipcapError) as err:  # the defaults (max_caption_chars 300) would take it
        add_batch(config({"max_caption_chars": 12}), long, tmp_path / "project")
    assert "caption_too_long" in str(err.value) and "validate.max_caption_chars=12" in str(err.value)
    assert not (tmp_path / "project" / "data").exists()
    half = _batch(tmp_path / "half", make_image, [{"image": "a.png", "caption": "A red ball."},
                                                   {"image": "gone.png", "caption": "A hat.", "missing": True}])
    added = add_batch(config({"max_bad_fraction": 0.5}), half, tmp_path / "project")  # the defaults refuse 1 of 2
    assert (added.images, added.quarantined) == (1, {"missing_file": 1})

"""The DVC project helpers: one command lock per project, and writing a version's dvc.lock entries."""

from __future__ import annotations

import threading
import time

import yaml

from clipcap.pipeline import dvc_project


def test_restore_lock_replaces_only_that_datasets_entries(tmp_path):
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "fetch@a": {"cmd": "old a"}, "train@a": {"cmd": "old a"}, "fetch@b": {"cmd": "b"}}}))
    written = dvc_project.restore_lock(tmp_path, "a", {"fetch@a": {"cmd": "v1"}})
    assert written == ["fetch@a"]
    stages = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert stages == {"fetch@b": {"cmd": "b"}, "fetch@a": {"cmd": "v1"}}


def test_restore_lock_writes_a_lock_file_in_a_fresh_clone(tmp_path):
    dvc_project.restore_lock(tmp_path, "a", {"train@a": {"cmd": "v1"}})
    assert yaml.safe_load((tmp_path / "dvc.lock").read_text()) == {"schema": "2.0", "stages": {"train@a": {"cmd": "v1"}}}


def test_a_second_command_waits_for_the_project_lock(tmp_path):
    (tmp_path / ".dvc").mkdir()
    order: list[str] = []
    held = threading.Event()

    def first():
        with dvc_project.project_lock(tmp_path):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with dvc_project.project_lock(tmp_path):
        order.append("second")
    thread.join()
    assert order == ["first done", "second"]


def test_stale_reads_what_dvc_status_finds_out_of_date(tmp_path):
    import subprocess

    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    assert dvc_project.stale(tmp_path, "a") == {"a": [{"changed deps": {"in.txt": "modified"}},
                                                      {"changed outs": {"out.txt": "deleted"}}]}
    dvc_project.dvc(["repro", "-q", "a"], tmp_path)
    assert dvc_project.stale(tmp_path, "a") == {}


def test_a_kept_batches_folder_survives_the_checkout_dvc_exp_run_starts_with(tmp_path):
    """DVC records files, not folders: checking out a data.dvc that records none of an empty data/<dataset>/
    removes it (and fetch's dependency with it). A README recorded in data.dvc keeps it."""
    import subprocess

    def run(*args):
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    for name in ("kept", "bare"):
        (tmp_path / "data" / name).mkdir(parents=True)
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "add", "-q", "data")  # a fresh project: data.dvc records 0 files
    written = dvc_project.keep_batches_folders(tmp_path, ["kept"])
    assert written == [tmp_path / "data" / "kept" / "README.md"]
    assert "data/kept/<batch>/" in written[0].read_text()
    assert dvc_project.stale(tmp_path, "data.dvc") == {}  # recorded
    run("dvc", "checkout", "--force")
    assert (tmp_path / "data" / "kept" / "README.md").is_file()
    assert not (tmp_path / "data" / "bare").exists()  # what happened to every dataset's folder before
    assert dvc_project.keep_batches_folders(tmp_path, ["kept"]) == []  # nothing new: data.dvc left alone

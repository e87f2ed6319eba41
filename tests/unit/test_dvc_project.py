"""The DVC project helpers: one command lock per project and one per dataset, stages reproduced with their
command outside the project lock, and writing a version's dvc.lock entries."""

from __future__ import annotations

import threading
import time

import pytest
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


def _project(path, stages: str):
    """A git + DVC project at ``path`` with ``in.txt`` and the ``dvc.yaml`` stages ``stages``."""
    import subprocess

    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=path, check=True, capture_output=True)
    (path / "in.txt").write_text("x")
    (path / "dvc.yaml").write_text("stages:\n" + stages)


def test_stale_reads_what_dvc_status_finds_out_of_date(tmp_path):
    _project(tmp_path, "  a:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
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


def test_one_dataset_waits_for_its_own_lock_not_for_anothers(tmp_path):
    (tmp_path / ".dvc").mkdir()
    with dvc_project.dataset_lock(tmp_path, "a"):
        with dvc_project.dataset_lock(tmp_path, "b", timeout=0.2):   # another dataset: at once
            pass
        with pytest.raises(dvc_project.DvcError, match="another retraining run of a"):
            with dvc_project.dataset_lock(tmp_path, "a", timeout=0.2):
                pass


def test_reproduce_runs_a_stale_stage_records_it_and_skips_it_next_time(tmp_path):
    _project(tmp_path, "  a:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    echoed: list[str] = []
    assert dvc_project.reproduce(tmp_path, "a", echoed.append) is True
    assert (tmp_path / "out.txt").read_text() == "x" and "> cp in.txt out.txt" in echoed
    assert dvc_project.stale(tmp_path, "a") == {}                                  # dvc.lock records it
    assert (tmp_path / ".dvc" / "cache" / "files").is_dir()                        # its output is in the cache
    assert dvc_project.reproduce(tmp_path, "a") is False                           # up to date: nothing runs
    (tmp_path / "in.txt").write_text("y")
    assert dvc_project.reproduce(tmp_path, "a") is True
    assert (tmp_path / "out.txt").read_text() == "y"


def test_a_stage_command_runs_outside_the_project_lock(tmp_path):
    """While one stage's command runs, another's dvc commands (and its whole stage) go through: what lets two
    datasets retrain at once. ``dvc repro`` itself would hold DVC's repository lock throughout."""
    _project(tmp_path, "  slow:\n    cmd: touch started && sleep 4 && cp in.txt slow.txt\n    deps: [in.txt]\n"
                       "    outs: [slow.txt]\n"
                       "  quick:\n    cmd: cp in.txt quick.txt\n    deps: [in.txt]\n    outs: [quick.txt]\n")
    slow = threading.Thread(target=dvc_project.reproduce, args=(tmp_path, "slow"))
    slow.start()
    while not (tmp_path / "started").exists():
        time.sleep(0.05)
    assert dvc_project.reproduce(tmp_path, "quick") is True
    assert not (tmp_path / "slow.txt").exists()          # quick's stage ended while slow's command ran
    slow.join()
    assert dvc_project.stale(tmp_path, "slow") == {} and dvc_project.stale(tmp_path, "quick") == {}


def test_a_failed_stage_command_names_the_stage_and_records_nothing(tmp_path):
    _project(tmp_path, "  a:\n    cmd: echo no such image >&2 && exit 3\n    deps: [in.txt]\n    outs: [out.txt]\n")
    with pytest.raises(dvc_project.DvcError, match=r"stage a failed .*exited 3:\nno such image"):
        dvc_project.reproduce(tmp_path, "a")
    assert not (tmp_path / "dvc.lock").exists()

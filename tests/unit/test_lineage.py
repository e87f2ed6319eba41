"""A registered run records its code (git commit, dirty flag), its pipeline (dvc.lock) and its data."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import yaml

from clipcap.pipeline.lineage import COMMIT_TAG, DATA_TAG, DIRTY_TAG, LOCK_TAG, data_digest, lineage_tags

MANIFEST = pd.DataFrame({"image_id": ["b", "a"], "captions": [["A cat."], ["A dog.", "A pup."]],
                         "split": ["train", "test"]})


def test_the_data_digest_follows_images_captions_and_splits_not_row_order():
    same = MANIFEST.iloc[::-1].reset_index(drop=True)
    assert data_digest(same) == data_digest(MANIFEST)
    edited = MANIFEST.assign(captions=[["A cat."], ["A dog."]])
    moved = MANIFEST.assign(split=["train", "val"])
    assert len({data_digest(MANIFEST), data_digest(edited), data_digest(moved)}) == 3


def test_tags_hold_the_commit_the_dirty_flag_and_this_datasets_lock_entries(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    assert COMMIT_TAG not in lineage_tags("toy", MANIFEST, tmp_path)  # not a git work tree: no commit claimed
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "params")
    lock = {"schema": "2.0", "stages": {
        "train@toy": {"cmd": "x", "outs": [{"path": "artifacts/toy/model", "md5": "abc.dir"}]},
        "train@other": {"cmd": "y", "outs": [{"path": "artifacts/other/model", "md5": "def.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = lineage_tags("toy", MANIFEST, tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert tags[COMMIT_TAG] == head and tags[DIRTY_TAG] == "false" and tags[DATA_TAG] == data_digest(MANIFEST)
    assert json.loads(tags["clipcap.dvc.train"]) == {"artifacts/toy/model": "abc.dir"}  # toy's stage only
    (tmp_path / "params.yaml").write_text("a: 2\n")
    edited = lineage_tags("toy", MANIFEST, tmp_path)
    assert edited[DIRTY_TAG] == "true" and edited[LOCK_TAG] == tags[LOCK_TAG]

import json

import pytest

from clipcap.config import DatasetConfig, SplitConfig
from clipcap.data.collect import collect_records
from clipcap.data.manifest import assign_split, build_records, group_records
from clipcap.data.sources import SourceError, SourceRecord, iter_batches, iter_folder


def _records(make_image, start, count):
    return [
        SourceRecord(f"t:{i}", str(make_image(f"img{i}.png", color=(i, 255 - i, (7 * i) % 256))), f"caption {i}",
                     "c", "t")
        for i in range(start, start + count)
    ]


def test_split_is_stable_when_items_are_added(make_image):
    cfg = SplitConfig(seed=3, test_fraction=0.2, val_fraction=0.1)
    before = build_records(_records(make_image, 0, 60), cfg)
    after = build_records(_records(make_image, 0, 60) + _records(make_image, 60, 90), cfg)
    old = dict(zip(before["image_id"], before["split"]))
    new = dict(zip(after["image_id"], after["split"]))
    assert len(new) == 150
    assert all(new[i] == split for i, split in old.items())
    assert set(after["split"]) == {"train", "val", "test"}


def test_split_depends_on_seed_and_fractions():
    ids = [f"{i:064x}" for i in range(2000)]
    splits = [assign_split(i, SplitConfig(seed=0, test_fraction=0.1, val_fraction=0.05)) for i in ids]
    assert 0.07 < splits.count("test") / len(ids) < 0.13
    reseeded = [assign_split(i, SplitConfig(seed=1, test_fraction=0.1, val_fraction=0.05)) for i in ids]
    assert splits != reseeded


def test_dataset_split_is_kept_and_missing_files_have_no_id(make_image, tmp_path):
    a = make_image("a.png")
    records = build_records([SourceRecord("k:0", str(a), "A red card.", "x", "t", split="test"),
                             SourceRecord("k:1", str(tmp_path / "gone.png"), "Gone.", "x", "t"),
                             SourceRecord("k:2", "", "", "x", "t", problem="invalid_json", detail="bad")],
                            SplitConfig(test_fraction=0.01))
    assert records["split"].tolist() == ["test", "", ""]
    assert len(records.loc[0, "image_id"]) == 64 and records.loc[1, "image_id"] == ""
    assert records["problem"].tolist() == ["", "", "invalid_json"]


def test_identical_images_are_one_item_with_merged_captions(make_image):
    a = make_image("a.png")
    b = make_image("copy/b.png")  # same pixels, same bytes
    records = build_records([SourceRecord("x:1", str(a), "A red card.", "x", "t"),
                             SourceRecord("x:2", str(b), "A red square.", "x", "t")], SplitConfig())
    frame = group_records(records)
    assert len(frame) == 1
    assert frame.iloc[0]["captions"] == ["A red card.", "A red square."]


def test_grouping_keeps_every_record_caption_once(make_image):
    """Validation relies on it: the clean manifest holds exactly one caption per clean record."""
    a, b = make_image("a.png"), make_image("b.png", color=(1, 2, 3))
    records = build_records([SourceRecord("x:1", str(a), "A red card.", "x", "t", split="train"),
                             SourceRecord("x:2", str(b), "A dark card.", "x", "t"),
                             SourceRecord("x:3", str(a), "A red card.", "x", "t", split="test"),
                             SourceRecord("x:4", str(a), "Red again.", "y", "u", split="val")], SplitConfig())
    frame = group_records(records)
    assert sorted(c for captions in frame["captions"] for c in captions) == sorted(records["caption"])
    assert frame.set_index("path").loc[str(a), "split"] == "test"


def test_folder_batch_jsonl_and_csv(make_image, tmp_path):
    make_image("batch1/x.png")
    make_image("batch1/y.png", color=(1, 2, 3))
    (tmp_path / "batch1" / "captions.jsonl").write_text(
        json.dumps({"image": "x.png", "caption": "An x."}) + "\n"
        + json.dumps({"image": "y.png", "captions": ["A y.", "Why."]}) + "\n"
        + json.dumps({"image": "x.png", "caption": "Another x."}) + "\n"
    )
    make_image("batch2/z.png", color=(9, 9, 9))
    (tmp_path / "batch2" / "captions.csv").write_text("image,caption,category\nz.png,A zed.,letters\n")
    records = list(iter_batches(tmp_path))
    captions = {}
    for record in records:
        captions.setdefault(record.path.rsplit("/", 1)[-1], []).append(record.caption)
    assert captions == {"x.png": ["An x.", "Another x."], "y.png": ["A y.", "Why."], "z.png": ["A zed."]}
    z = records[-1]
    assert z.category == "letters" and z.source == "batch:batch2" and z.origin.endswith("captions.csv:2")
    assert records[1].origin.endswith("captions.jsonl:2 caption 1")


def test_a_batch_still_being_copied_is_not_read(make_image, tmp_path):
    """``clipcap add-batch`` copies into ``.<name>.partial`` and renames it whole: a run meanwhile sees none of it."""
    make_image(".late.partial/x.png")
    (tmp_path / ".late.partial" / "captions.jsonl").write_text(json.dumps({"image": "x.png", "caption": "An x."}))
    assert list(iter_batches(tmp_path)) == []
    (tmp_path / ".late.partial").rename(tmp_path / "late")
    assert [record.source for record in iter_batches(tmp_path)] == ["batch:late"]


def test_bad_jsonl_lines_become_problem_records_and_the_rest_is_read(tmp_path):
    (tmp_path / "captions.jsonl").write_bytes(
        b'\xef\xbb\xbf{"image": "a.png", "caption": "ok"}\n{not json\n\n'
        b'{"image": "b.png", "caption": "Caf\xe9"}\r\n{"image": "c.png", "caption": "fine"}\r\n')
    records = list(iter_folder(tmp_path))
    assert [(r.origin.rsplit(":", 1)[1], r.problem) for r in records] == [
        ("1", None), ("2", "invalid_json"), ("4", "invalid_utf8"), ("5", None)]
    assert records[0].caption == "ok" and records[3].caption == "fine"
    assert "\\xe9" in records[2].detail


def test_bad_csv_rows_become_problem_records(tmp_path):
    (tmp_path / "captions.csv").write_bytes(
        b"image,caption\na.png,A fine row.\nb.png,Too,many,fields\nc.png,Caf\xe9\nd.png\n\"e.png\",\"Quoted, with comma.\"\n")
    records = list(iter_folder(tmp_path))
    assert [r.problem for r in records] == [None, "invalid_csv", "invalid_utf8", "missing_field", None]
    assert records[4].caption == "Quoted, with comma." and records[1].origin.endswith("captions.csv:3")


def test_csv_without_header_is_a_clear_error(tmp_path):
    (tmp_path / "captions.csv").write_text("a.png,A caption.\n")
    with pytest.raises(SourceError, match="header naming the columns image,caption"):
        list(iter_folder(tmp_path))


def test_missing_captions_file_or_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no captions file; add captions.jsonl or captions.csv"):
        list(iter_folder(tmp_path))
    with pytest.raises(SourceError, match="folder not found; set dataset.root"):
        list(iter_folder(tmp_path / "nope"))


def test_tuxpaint_source_reads_stamps():
    records = list(collect_records(DatasetConfig(source="tuxpaint", limit=20, batches_dir="/nonexistent")))
    assert len(records) == 20
    assert all(r.path.endswith(".png") and r.caption and r.problem is None for r in records)
    assert {r.category for r in records} <= {
        "animals", "clothes", "food", "hobbies", "household", "medical", "military", "naturalforces",
        "people", "plants", "seasonal", "space", "sports", "symbols", "town", "vehicles"}


def test_limit_counts_images_not_captions(make_image, tmp_path):
    for name in ("a", "b", "c"):
        make_image(f"f/{name}.png", color=(ord(name), 0, 0))
    (tmp_path / "f" / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{n}.png", "caption": f"{n} {k}"}) + "\n" for k in range(2) for n in "abc"))
    records = list(collect_records(DatasetConfig(source="folder", root=str(tmp_path / "f"), limit=2,
                                                 batches_dir="/nonexistent")))
    assert [r.caption for r in records] == ["a 0", "b 0", "a 1", "b 1"]


def test_missing_tuxpaint_root_says_how_to_install(tmp_path):
    with pytest.raises(SourceError, match="apt-get install"):
        list(collect_records(DatasetConfig(source="tuxpaint", root=str(tmp_path / "none"))))

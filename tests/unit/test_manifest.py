import json

import pytest

from clipcap.config import DatasetConfig, SplitConfig
from clipcap.data.manifest import assign_split, build_manifest, collect_items
from clipcap.data.sources import CaptionedImage, SourceError, iter_batches, iter_folder


def _items(make_image, start, count):
    return [
        CaptionedImage(make_image(f"img{i}.png", color=(i, 255 - i, (7 * i) % 256)), (f"caption {i}",), "c", "t")
        for i in range(start, start + count)
    ]


def test_split_is_stable_when_items_are_added(make_image):
    cfg = SplitConfig(seed=3, test_fraction=0.2, val_fraction=0.1)
    before = build_manifest(_items(make_image, 0, 60), cfg)
    after = build_manifest(_items(make_image, 0, 60) + _items(make_image, 60, 90), cfg)
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


def test_identical_images_are_one_item_with_merged_captions(make_image, tmp_path):
    a = make_image("a.png")
    b = make_image("copy/b.png")  # same pixels, same bytes
    frame = build_manifest([CaptionedImage(a, ("A red card.",), "x", "t"),
                            CaptionedImage(b, ("A red square.",), "x", "t")], SplitConfig())
    assert len(frame) == 1
    assert frame.iloc[0]["captions"] == ["A red card.", "A red square."]


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
    items = {i.path.name: i for i in iter_batches(tmp_path)}
    assert items["x.png"].captions == ("An x.", "Another x.")
    assert items["y.png"].captions == ("A y.", "Why.")
    assert items["z.png"].category == "letters" and items["z.png"].source == "batch:batch2"


def test_bad_captions_file_names_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(SourceError, match=r"captions.jsonl:2"):
        list(iter_folder(tmp_path))


def test_tuxpaint_source_reads_stamps():
    items = collect_items(DatasetConfig(source="tuxpaint", limit=20, batches_dir="/nonexistent"))
    assert len(items) == 20
    assert all(i.path.suffix == ".png" and i.captions[0] for i in items)
    assert {i.category for i in items} <= {
        "animals", "clothes", "food", "hobbies", "household", "medical", "military", "naturalforces",
        "people", "plants", "seasonal", "space", "sports", "symbols", "town", "vehicles"}


def test_missing_tuxpaint_root_says_how_to_install(tmp_path):
    with pytest.raises(SourceError, match="apt-get install"):
        collect_items(DatasetConfig(source="tuxpaint", root=str(tmp_path / "none")))

"""Annotation sources (Karpathy split files, nocaps), safe paths, dataset params, and the fetch wiring of downloads."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
from imagefiles import noise

from clipcap.pipeline.layout import Layout
from clipcap.pipeline.stages import fetch, validate
from clipcap.config import Config, ConfigError, DatasetConfig, ValidateConfig, config_from_dict
from clipcap.data.formats import iter_karpathy, iter_nocaps
from clipcap.data.manifest import read_manifest, read_records
from clipcap.data.sources import SourceError, iter_folder, resolve_image

NO_BATCHES = "/nonexistent-batches"


def karpathy_json(dataset: str = "coco") -> dict:
    coco = dataset == "coco"

    def entry(index: int, split: str, folder: str) -> dict:
        name = f"COCO_{folder}_{index:012d}.jpg" if coco else f"{index}_flickr.jpg"
        sentences = [{"raw": f"Picture {index}, sentence {k}. ", "tokens": ["picture"]} for k in range(2)]
        return {"filepath": folder, "filename": name, "split": split, "sentences": sentences, "cocoid": index,
                "imgid": index} if coco else {"filename": name, "split": split, "sentences": sentences, "imgid": index}

    images = [entry(0, "train", "train2014"), entry(1, "restval", "val2014"), entry(2, "val", "val2014"),
              entry(3, "test", "val2014"), entry(4, "holdout", "val2014")]
    return {"dataset": dataset, "images": images}


def write_karpathy_images(data: dict, roots: list[Path]) -> None:
    """Each image under the root whose name matches its filepath (or the first root)."""
    for index, image in enumerate(data["images"]):
        folder = image.get("filepath", "")
        root = next((r for r in roots if r.name == folder), roots[0])
        noise(root / folder / image["filename"] if folder else root / image["filename"], size=(24, 24), seed=index)


def test_karpathy_keeps_its_own_split_and_finds_filepath(tmp_path):
    data = karpathy_json("coco")
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    write_karpathy_images(data, [tmp_path / "coco"])
    records = list(iter_karpathy(tmp_path / "dataset_coco.json", [tmp_path / "coco"]))
    assert len(records) == 2 * 4 + 1                          # two sentences each; the unknown split is one bad row
    splits = {Path(r.path).name: r.split for r in records if not r.problem}
    assert splits == {"COCO_train2014_000000000000.jpg": "train", "COCO_val2014_000000000001.jpg": "train",
                      "COCO_val2014_000000000002.jpg": "val", "COCO_val2014_000000000003.jpg": "test"}
    assert records[0].path == str(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000000.jpg")
    assert records[0].caption == "Picture 0, sentence 0. " and records[0].source == "karpathy:coco"
    assert records[0].origin == "dataset_coco.json:images[0].sentences[0]"
    [holdout] = [r for r in records if r.problem]
    assert holdout.problem == "bad_split" and "'holdout'" in holdout.detail
    assert len(list(iter_karpathy(tmp_path / "dataset_coco.json", [tmp_path / "coco"], limit=2))) == 4


def test_karpathy_flickr_images_sit_in_the_root(tmp_path):
    data = karpathy_json("flickr8k")
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    write_karpathy_images(data, [tmp_path / "Flicker8k_Dataset"])
    records = [r for r in iter_karpathy(tmp_path / "dataset_flickr8k.json", [tmp_path / "Flicker8k_Dataset"])
               if not r.problem]
    assert all(Path(r.path).parent == tmp_path / "Flicker8k_Dataset" and Path(r.path).is_file() for r in records)
    assert {r.source for r in records} == {"karpathy:flickr8k"}


def test_karpathy_through_fetch_and_validate(tmp_path):
    data = karpathy_json("coco")
    data["images"][2]["sentences"].append({"raw": ""})         # an empty sentence: quarantined, not fatal
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    write_karpathy_images(data, [tmp_path / "coco"])
    cfg = Config(dataset=DatasetConfig(source="karpathy", root=str(tmp_path / "coco"), batches_dir=NO_BATCHES,
                                       annotations=str(tmp_path / "dataset_coco.json")),
                 validate=ValidateConfig(min_image_side=8, max_bad_fraction=0.5))
    fetch.run(cfg, Layout(tmp_path / "artifacts"))
    validate.run(cfg, Layout(tmp_path / "artifacts"))
    manifest = read_manifest(Layout(tmp_path / "artifacts").manifest)
    assert sorted(manifest["split"]) == ["test", "train", "train", "val"]
    assert all(captions[0].endswith("sentence 0.") for captions in manifest["captions"])  # whitespace normalised
    reasons = [json.loads(line)["reason"] for line in Layout(tmp_path / "artifacts").quarantine.read_text().splitlines()]
    assert sorted(reasons) == ["bad_split", "empty_caption"]


def nocaps_json() -> dict:
    domains = ["in-domain", "near-domain", "out-domain", "near-domain"]
    images = [{"id": i, "file_name": f"{i:04x}abcd.jpg", "domain": d, "open_images_id": f"{i:04x}abcd",
               "height": 24, "width": 24} for i, d in enumerate(domains)]
    annotations = [{"image_id": i, "caption": f"Nocaps image {i}, caption {k}.", "id": 10 * i + k}
                   for i in range(4) for k in range(3)]
    annotations.append({"image_id": 99, "caption": "An image the file does not list.", "id": 999})
    return {"licenses": [], "info": {}, "images": images, "annotations": annotations}


def test_nocaps_keeps_domain_and_is_all_test(tmp_path):
    data = nocaps_json()
    (tmp_path / "nocaps_val_4500_captions.json").write_text(json.dumps(data))
    for index, image in enumerate(data["images"]):
        noise(tmp_path / "val" / image["file_name"], size=(24, 24), seed=index)
    cfg = Config(dataset=DatasetConfig(source="nocaps", root=str(tmp_path / "val"), batches_dir=NO_BATCHES,
                                       annotations=str(tmp_path / "nocaps_val_4500_captions.json")),
                 validate=ValidateConfig(min_image_side=8, max_bad_fraction=0.1))
    records = fetch.run(cfg, Layout(tmp_path / "artifacts"))
    assert len(records) == 13 and set(records["split"]) == {"test"}
    orphan = records[records["problem"] != ""]
    assert orphan["problem"].tolist() == ["missing_field"] and "99" in orphan["detail"].iloc[0]
    validate.run(cfg, Layout(tmp_path / "artifacts"))
    manifest = read_manifest(Layout(tmp_path / "artifacts").manifest)
    assert len(manifest) == 4 and set(manifest["split"]) == {"test"}
    assert sorted(manifest["domain"]) == ["in-domain", "near-domain", "near-domain", "out-domain"]
    assert all(len(c) == 3 for c in manifest["captions"])
    first = manifest[manifest["path"].str.endswith("0000abcd.jpg")].iloc[0]
    assert first["domain"] == "in-domain" and first["captions"][0] == "Nocaps image 0, caption 0."


def test_every_source_checks_image_paths_and_captions_alike(tmp_path):
    """Folder, Karpathy and nocaps rows share one check: a lone surrogate in the image path or the caption is
    invalid_utf8, a path leaving the folder unsafe_path, a caption that is not a string missing_field."""
    noise(tmp_path / "a.png", size=(24, 24))
    names = ["a\ud800.png", "../a.png", "a.png", "a.png", "a.png"]
    captions = ["A lone surrogate in the path.", "Climbing out.", 7, "A lone surrogate \ud800.", "A fine picture."]
    expected = ["invalid_utf8", "unsafe_path", "missing_field", "invalid_utf8", None]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
        {"filename": n, "split": "train", "sentences": [{"raw": c}]} for n, c in zip(names, captions)]}))
    (tmp_path / "nocaps.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(captions)]}))
    (tmp_path / "batch").mkdir()
    noise(tmp_path / "batch" / "a.png", size=(24, 24))
    (tmp_path / "batch" / "captions.jsonl").write_text(
        "".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in zip(names, captions)))
    for records in (list(iter_karpathy(tmp_path / "karpathy.json", [tmp_path])),
                    list(iter_nocaps(tmp_path / "nocaps.json", [tmp_path])),
                    list(iter_folder(tmp_path / "batch"))):
        assert [r.problem for r in records] == expected
        assert "path" in records[0].detail and "caption" in records[3].detail and Path(records[4].path).is_file()


def test_a_row_with_a_bad_image_path_gives_one_record_per_caption(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a\ud800.png", "captions": ["One.", "Two."]}) + "\n")
    records = list(iter_folder(tmp_path))
    assert [(r.origin.rsplit(" ", 1)[-1], r.problem, r.caption) for r in records] == [
        ("1", "invalid_utf8", "One."), ("2", "invalid_utf8", "Two.")]


def test_annotation_file_problems_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="annotations file not found; set dataset.annotations"):
        list(iter_karpathy(tmp_path / "dataset_coco.json", [tmp_path]))
    (tmp_path / "cut.json").write_text('{"images": [{"filename": "a.jpg", ')
    with pytest.raises(SourceError, match=r"cut.json:1:\d+: not valid JSON .* download it again"):
        list(iter_karpathy(tmp_path / "cut.json", [tmp_path]))
    (tmp_path / "other.json").write_text('{"annotations": []}')
    with pytest.raises(SourceError, match="not a nocaps"):
        list(iter_nocaps(tmp_path / "other.json", [tmp_path]))


def test_resolve_image_refuses_escapes_and_allows_inside_links(tmp_path):
    root = tmp_path / "root"
    noise(root / "a.png")
    noise(tmp_path / "outside.png")
    os.symlink(root / "a.png", root / "in.png")
    os.symlink(tmp_path / "outside.png", root / "out.png")
    os.symlink(tmp_path, root / "up")                     # a linked folder leading out
    assert resolve_image(root, "a.png") == (root / "a.png", "")
    assert resolve_image(root, "in.png") == (root / "in.png", "")
    for name in ("../outside.png", "sub/../../outside.png", "/etc/passwd", "C:\\Windows\\x.png", "..\\outside.png",
                 "out.png", "up/outside.png"):
        path, why = resolve_image(root, name)
        assert path is None and why, name
    assert resolve_image(root, "x" * 5000)[0] == root / ("x" * 5000)  # too long a name: kept, reported later
    second = tmp_path / "second"
    noise(second / "b.png")
    assert resolve_image([root, second], "b.png") == (second / "b.png", "")
    assert resolve_image([root, second], "c.png") == (root / "c.png", "")  # missing: the first root, for the message


@pytest.mark.parametrize(("params", "key"), [
    ({"source": "folder"}, "dataset.root"),
    ({"source": "karpathy", "root": "coco"}, "dataset.annotations"),
    ({"source": "karpathy", "annotations": "a.json"}, "dataset.root"),
    ({"source": "nocaps", "annotations": "a.json", "root": "x", "images_url": "https://h/x.zip"}, "dataset.root"),
    ({"source": "karpathy", "annotations": "a.json", "images_url": "ftp://h/x.zip"}, "dataset.images_url"),
    ({"source": "karpathy", "annotations": "a.json", "images_url": ["https://h/a.zip", "https://h/b.zip"],
      "images_sha256": "a" * 64}, "dataset.images_sha256"),
    ({"source": "karpathy", "annotations_url": "https://h/a.zip", "annotations_sha256": "xyz", "root": "r"},
     "dataset.annotations_sha256"),
    ({"source": "karpathy", "annotations": "a.json", "root": "r", "annotations_sha256": "a" * 64},
     "dataset.annotations_sha256"),
    ({"source": "folder", "root": "r", "annotations_url": "https://h/a.json"}, "dataset.annotations_url"),
    ({"source": "tuxpaint", "limit": 0}, "dataset.limit"),
    ({"source": "karpathy", "annotations": "a.json", "images_url": [1]}, "dataset.images_url"),
])
def test_bad_dataset_params_name_the_key(params, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"dataset": params})
    assert str(err.value).startswith(key), err.value


@pytest.mark.parametrize(("params", "key"), [
    ({"max_bad_fraction": 1.5}, "validate.max_bad_fraction"),
    ({"max_image_pixels": 10}, "validate.max_image_pixels"),
    ({"num_workers": -1}, "validate.num_workers"),
    ({"min_caption_chars": 0}, "validate.min_caption_chars"),
    ({"max_caption_chars": 1, "min_caption_chars": 2}, "validate.max_caption_chars"),
])
def test_bad_validate_params_name_the_key(params, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"validate": params})
    assert str(err.value).startswith(key), err.value


def test_list_of_image_urls_loads_as_a_tuple():
    cfg = config_from_dict({"dataset": {"source": "karpathy", "annotations_url": "https://h/caption_datasets.zip",
                                        "annotations": "dataset_coco.json",
                                        "images_url": ["https://h/train2014.zip", "https://h/val2014.zip"],
                                        "images_sha256": ["a" * 64, "b" * 64]}}).dataset
    assert cfg.image_urls == ("https://h/train2014.zip", "https://h/val2014.zip")
    assert cfg.image_sha256s == ("a" * 64, "b" * 64)


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """``clipcap.data.download`` replaced by a fake serving local files by URL; records every call."""
    served: dict[str, bytes] = {}
    calls: list[tuple[str, Path, str | None]] = []

    def download(url, target, sha256=None, **kwargs):
        target = Path(target)
        calls.append((url, target, sha256))
        if url not in served:
            raise AssertionError(f"unexpected URL {url}")
        if sha256 is not None:
            assert hashlib.sha256(served[url]).hexdigest() == sha256
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(served[url])
        return target

    def extract(archive, destination):
        destination = Path(destination)
        if not destination.exists():
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(destination)
        return destination

    module = types.SimpleNamespace(download=download, extract=extract)
    monkeypatch.setitem(sys.modules, "clipcap.data.download", module)
    monkeypatch.setenv("CLIPCAP_CACHE", str(tmp_path / "cache"))
    return served, calls


def _zip(files: dict[str, bytes]) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_fetch_downloads_split_file_and_image_archives_into_the_cache(tmp_path, fake_download):
    served, calls = fake_download
    data = karpathy_json("coco")
    staging = tmp_path / "staging"
    write_karpathy_images(data, [staging / "train2014", staging / "val2014"])
    train = {f"train2014/{p.name}": p.read_bytes() for p in (staging / "train2014" / "train2014").iterdir()}
    val = {f"val2014/{p.name}": p.read_bytes() for p in (staging / "val2014" / "val2014").iterdir()}
    served["https://example.test/caption_datasets.zip"] = _zip({"dataset_coco.json": json.dumps(data).encode(),
                                                                 "dataset_flickr8k.json": b"{}"})
    served["https://example.test/zips/train2014.zip"] = _zip(train)
    served["https://example.test/zips/val2014.zip"] = _zip(val)
    train_sha, val_sha = (hashlib.sha256(served[f"https://example.test/zips/{n}.zip"]).hexdigest()
                          for n in ("train2014", "val2014"))
    cfg = Config(dataset=DatasetConfig(
        source="karpathy", annotations="dataset_coco.json", batches_dir=NO_BATCHES,
        annotations_url="https://example.test/caption_datasets.zip",
        images_url=("https://example.test/zips/train2014.zip", "https://example.test/zips/val2014.zip"),
        images_sha256=(train_sha, val_sha)))

    records = fetch.run(cfg, Layout(tmp_path / "artifacts"))
    downloads = tmp_path / "cache" / "downloads"
    assert [c[0] for c in calls] == ["https://example.test/caption_datasets.zip",
                                     "https://example.test/zips/train2014.zip", "https://example.test/zips/val2014.zip"]
    assert all(target.is_relative_to(downloads) for _, target, _ in calls)
    assert [c[2] for c in calls] == [None, train_sha, val_sha]          # each archive's own checksum
    good = records[records["problem"] == ""]
    assert len(good) == 8 and (good["image_id"].str.len() == 64).all()  # every image found in its own archive
    assert all(Path(p).is_relative_to(downloads) for p in good["path"])
    assert {Path(p).parent.name for p in good["path"]} == {"train2014", "val2014"}
    assert len(read_records(Layout(tmp_path / "artifacts").raw_manifest)) == len(records)

    calls.clear()                                                       # a second run reuses the cache
    fetch.run(cfg, Layout(tmp_path / "artifacts"))
    assert len(calls) == 3 and all(target.exists() for _, target, _ in calls)


def test_fetch_with_a_plain_json_url_and_local_images(tmp_path, fake_download):
    served, calls = fake_download
    data = nocaps_json()
    served["https://example.test/nocaps_val_4500_captions.json"] = json.dumps(data).encode()
    for index, image in enumerate(data["images"]):
        noise(tmp_path / "val" / image["file_name"], size=(24, 24), seed=index)
    cfg = Config(dataset=DatasetConfig(source="nocaps", root=str(tmp_path / "val"), batches_dir=NO_BATCHES,
                                       annotations_url="https://example.test/nocaps_val_4500_captions.json"))
    records = fetch.run(cfg, Layout(tmp_path / "artifacts"))
    assert len(calls) == 1 and calls[0][1].name == "nocaps_val_4500_captions.json"
    assert (records["problem"] == "").sum() == 12


def test_missing_local_files_say_which_key_to_set(tmp_path):
    cfg = DatasetConfig(source="karpathy", root=str(tmp_path), annotations=str(tmp_path / "dataset_coco.json"),
                        batches_dir=NO_BATCHES)
    with pytest.raises(SourceError, match="dataset.annotations: .* set dataset.annotations_url"):
        fetch.run(Config(dataset=cfg), Layout(tmp_path / "a"))
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy_json()))
    cfg = DatasetConfig(source="karpathy", root=str(tmp_path / "nope"), annotations=str(tmp_path / "dataset_coco.json"),
                        batches_dir=NO_BATCHES)
    with pytest.raises(SourceError, match="dataset.root: .* is not a folder"):
        fetch.run(Config(dataset=cfg), Layout(tmp_path / "a"))

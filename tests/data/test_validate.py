"""Validation quarantines bad input rows with one reason each and keeps every good one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from imagefiles import (
    BLUE,
    RED,
    cmyk_jpeg,
    exif_rotated_jpeg,
    gray16_png,
    la_png,
    near,
    noise,
    palette_with_transparency,
    png_header,
    save,
    truncated,
)
from PIL import Image

from clipcap.pipeline.layout import Layout
from clipcap.pipeline.stages import embed, fetch, validate
from clipcap.config import Config, DatasetConfig, EncoderConfig, SplitConfig, ValidateConfig
from clipcap.images import load_rgb
from clipcap.data.manifest import build_records, read_manifest, read_records
from clipcap.data.sources import iter_folder
from clipcap.data.validate import DataValidationError, validate_records, write_quarantine
from clipcap.pipeline.embedding_store import EmbeddingStore
from clipcap.modeling.encoders import encoder_key

CHECKS = ValidateConfig(min_image_side=8, max_image_pixels=10_000_000, max_bad_fraction=0.9, num_workers=2)


def _line(image, caption=None, **extra) -> bytes:
    row = {"image": image, **({"caption": caption} if caption is not None else {}), **extra}
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"


def build_batch(root: Path) -> tuple[bytes, dict[int, str], set[tuple[str, str]]]:
    """A folder batch mixing good and bad inputs.

    Returns the captions file's bytes, {line number: expected reason} of the bad lines, and
    the (file name, caption) pairs that must reach the clean manifest.
    """
    outside = root.parent / "outside"
    noise(outside / "secret.png", seed=7)
    noise(root / "good.png", seed=1)
    noise(root / "sub" / "dir" / "deep.png", seed=2)
    noise(root / "win" / "backslash.png", seed=3)
    cmyk_jpeg(root / "cmyk.jpg")
    gray16_png(root / "gray16.png")
    exif_rotated_jpeg(root / "rotated.jpg", orientation=6)
    palette_with_transparency(root / "palette.png")
    la_png(root / "la.png")
    shutil.copy(root / "good.png", root / "good-copy.png")          # same bytes: the same image
    os.symlink(root / "sub" / "dir" / "deep.png", root / "link-inside.png")
    os.symlink(outside / "secret.png", root / "link-out.png")
    truncated(root / "truncated.jpg", "JPEG")
    truncated(root / "truncated.png", "PNG")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("<html>404 Not Found</html>\n")
    noise(root / "dot.png", size=(1, 1), seed=4)
    png_header(root / "bomb.png", 100_000, 100_000)                  # 10^10 pixels: PIL's own limit
    png_header(root / "big.png", 4000, 3000)                         # 12 M > validate.max_image_pixels=10 M
    png_header(root / "strip.png", 5, 100_000)                       # 3 KB; padded to a square, 10^10 pixels
    save(Image.new("L", (320, 10), 90), root / "at-ratio.png")        # 32:1, validate.max_aspect_ratio's default
    save(Image.new("L", (330, 10), 90), root / "past-ratio.png")      # 33:1
    (root / "folder.jpg").mkdir()

    lines: list[tuple[bytes, str | None]] = [
        # good rows (the reason is None)
        (_line("good.png", captions=["A noisy square.", "Random coloured pixels."]), None),
        (_line("sub/dir/deep.png", "A picture in a sub-folder."), None),
        (_line("win\\backslash.png", "A path written with a backslash."), None),
        (_line("cmyk.jpg", "A red card printed in CMYK."), None),
        (_line("gray16.png", "A 16-bit grey scan."), None),
        (_line("rotated.jpg", "A photo taken with the camera on its side."), None),
        (_line("palette.png", "A red bar on a transparent background."), None),
        (_line("la.png", "A grey bar on a transparent background."), None),
        (_line("at-ratio.png", "A long grey bar."), None),
        (_line("link-inside.png", "A symlink that stays inside the folder."), None),
        (_line("good.png", "  Whitespace\tand\nnewlines   are normalised. "), None),
        (_line("good.png", "Crème brûlée, naïve café 🎉."), None),
        # bad rows and the reason each must get
        (_line("truncated.jpg", "A truncated JPEG."), "corrupt_image"),
        (_line("truncated.png", "A truncated PNG."), "corrupt_image"),
        (_line("zero.jpg", "An empty file."), "empty_file"),
        (_line("text.jpg", "A text file named like a photo."), "not_an_image"),
        (_line("dot.png", "A single pixel."), "too_small"),
        (_line("bomb.png", "A decompression bomb."), "too_large"),
        (_line("big.png", "Too many pixels for the limit."), "too_large"),
        (_line("strip.png", "A strip five pixels wide."), "bad_shape"),
        (_line("past-ratio.png", "A grey bar a little too long."), "bad_shape"),
        (_line("nowhere.png", "A file that does not exist."), "missing_file"),
        (_line("folder.jpg", "A folder with an image name."), "missing_file"),
        (_line("good.png", "A noisy square."), "duplicate"),                  # same image and caption as line 1
        (_line("good-copy.png", "Random coloured pixels."), "duplicate"),    # same content, another name
        (_line("good.png", ""), "empty_caption"),
        (_line("good.png", " \t "), "empty_caption"),
        (_line("good.png", "x"), "caption_too_short"),
        (_line("good.png", "A very long caption. " * 238), "caption_too_long"),   # 4,998 characters
        (b'{"image": "good.png", "caption": "Caf\xe9 in Latin-1."}\n', "invalid_utf8"),
        (b'{"image": "good.png", "caption": "A lone surrogate \\ud800."}\n', "invalid_utf8"),
        (_line("good.png", "A bell\x07 and an escape \x1b[31mred\x1b[0m."), "control_characters"),
        (_line("../outside/secret.png", "Climbing out."), "unsafe_path"),
        (_line(str(outside / "secret.png"), "An absolute path."), "unsafe_path"),
        (_line("link-out.png", "A symlink pointing out."), "unsafe_path"),
        (b'{"image": "good.png", "caption": "no closing brace"\n', "invalid_json"),
        (b'["good.png", "a list, not an object"]\n', "invalid_json"),
        (_line("good.png"), "missing_field"),
        (json.dumps({"caption": "No image."}).encode() + b"\n", "missing_field"),
        (_line("la.png", "Lines after the bad ones are still read."), None),
    ]
    data = b"".join(line for line, _ in lines)
    bad = {number: reason for number, (_, reason) in enumerate(lines, start=1) if reason}
    good = {
        ("good.png", "A noisy square."), ("good.png", "Random coloured pixels."),
        ("good.png", "Whitespace and newlines are normalised."), ("good.png", "Crème brûlée, naïve café 🎉."),
        ("deep.png", "A picture in a sub-folder."), ("backslash.png", "A path written with a backslash."),
        ("cmyk.jpg", "A red card printed in CMYK."), ("gray16.png", "A 16-bit grey scan."),
        ("rotated.jpg", "A photo taken with the camera on its side."),
        ("palette.png", "A red bar on a transparent background."), ("la.png", "A grey bar on a transparent background."),
        ("deep.png", "A symlink that stays inside the folder."), ("la.png", "Lines after the bad ones are still read."),
        ("at-ratio.png", "A long grey bar."),
    }
    return data, bad, good


@pytest.fixture
def batch(tmp_path):
    root = tmp_path / "batch"
    root.mkdir()
    data, bad, good = build_batch(root)
    (root / "captions.jsonl").write_bytes(data)
    return root, bad, good


def test_every_bad_input_is_quarantined_with_its_reason_and_every_good_one_kept(batch):
    root, bad, good = batch
    assert len(set(bad.values())) >= 15
    records = build_records(iter_folder(root), SplitConfig())
    result = validate_records(records, CHECKS)

    # one reason per quarantined row, the right one
    reasons = {int(r.rsplit(":", 1)[1]): reason for r, reason in zip(result.quarantine["record"],
                                                                      result.quarantine["reason"])}
    assert reasons == bad
    assert result.quarantine["detail"].str.len().min() > 0
    # the clean manifest holds exactly the good (image, caption) pairs
    kept = {(Path(p).name, c) for p, captions in zip(result.manifest["path"], result.manifest["captions"])
            for c in captions}
    assert kept == good
    # nothing lost: good + quarantined = every input row (the multi-caption line gives two rows)
    assert len(records) == len(bad) + len(good) == result.clean_records + result.quarantined
    assert result.records == len(records) and result.clean_records == len(good)
    # identical content is one image whose captions are merged (good.png = good-copy.png, deep.png = link-inside.png)
    by_name = {Path(p).name: list(c) for p, c in zip(result.manifest["path"], result.manifest["captions"])}
    assert len(by_name["good.png"]) == 4 and len(by_name["deep.png"]) == 2
    assert result.manifest["image_id"].is_unique and len(result.manifest) == 9
    assert all(e["success"] for e in result.expectations if e["suite"] == "manifest")
    failed = {e["reason"] for e in result.expectations if e["suite"] == "records" and not e["success"]}
    assert failed == {"control_characters", "empty_caption", "caption_too_short", "caption_too_long"}
    assert result.success and result.bad_fraction == len(bad) / len(records)  # under max_bad_fraction=0.9


def test_valid_unusual_images_survive_and_load_as_correct_rgb(batch):
    root, _, _ = batch
    result = validate_records(build_records(iter_folder(root), SplitConfig()), CHECKS)
    paths = {Path(p).name: p for p in result.manifest["path"]}
    assert {"cmyk.jpg", "gray16.png", "rotated.jpg", "palette.png", "la.png"} <= set(paths)
    assert near(load_rgb(paths["cmyk.jpg"]).getpixel((3, 3)), RED)
    gray = load_rgb(paths["gray16.png"])
    assert gray.getpixel((0, 0)) == (255, 255, 255) and gray.getpixel((31, 0)) == (0, 0, 0)
    rotated = load_rgb(paths["rotated.jpg"])
    assert rotated.size == (20, 40) and near(rotated.getpixel((15, 4)), BLUE, 12)
    assert load_rgb(paths["palette.png"]).getpixel((0, 0)) == (255, 255, 255)


def _config(tmp_path, root, **validate) -> Config:
    return Config(dataset=DatasetConfig(source="folder", root=str(root), batches_dir=str(tmp_path / "no-batches")),
                  validate=ValidateConfig(min_image_side=8, max_image_pixels=10_000_000, **validate))


def test_stages_write_clean_manifest_quarantine_and_report(batch, tmp_path):
    root, bad, good = batch
    cfg, layout = _config(tmp_path, root, max_bad_fraction=0.9), Layout(tmp_path / "artifacts")
    fetch.run(cfg, layout)
    assert len(read_records(layout.raw_manifest)) == len(bad) + len(good)
    validate.run(cfg, layout)
    manifest = read_manifest(layout.manifest)
    assert sum(map(len, manifest["captions"])) == len(good)
    assert list(manifest.columns) == ["image_id", "path", "captions", "category", "source", "split", "domain"]
    quarantined = [json.loads(line) for line in layout.quarantine.read_text().splitlines()]
    assert [q["reason"] for q in quarantined] == list(bad.values())
    assert set(quarantined[0]) == {"record", "reason", "detail", "path", "caption", "source"}
    report = json.loads(layout.validation_report.read_text())
    assert report["success"] and report["quarantined_rows"] == len(bad) and report["clean_rows"] == len(good)
    assert report["reasons"]["corrupt_image"] == 2 and report["reasons"]["unsafe_path"] == 3
    markdown = layout.validation_markdown.read_text()
    assert "PASSED" in markdown and "| unsafe_path | 3 |" in markdown and str(layout.quarantine) in markdown

    # every good image is embedded (the unusual but valid ones included), nothing else
    embed_cfg = dataclasses.replace(cfg, encoder=EncoderConfig(name="efficientnet-lite0:random", batch_size=4,
                                                               num_workers=0))
    embed.run(embed_cfg, layout)
    store = EmbeddingStore(layout.embeddings, encoder_key(embed_cfg.encoder.name))
    assert set(store.index()) == set(manifest["image_id"])
    assert store.get(manifest["image_id"].tolist()).isfinite().all()


def test_stage_fails_above_the_bad_fraction_and_says_why(batch, tmp_path):
    root, bad, good = batch
    cfg, layout = _config(tmp_path, root, max_bad_fraction=0.05), Layout(tmp_path / "artifacts")
    layout.manifest.parent.mkdir(parents=True)
    layout.manifest.write_text("a stale manifest from an earlier run")
    fetch.run(cfg, layout)
    with pytest.raises(DataValidationError) as err:
        validate.run(cfg, layout)
    message = str(err.value)
    total = len(bad) + len(good)
    assert f"{len(bad)} of {total} input rows ({len(bad) / total:.1%}) were quarantined" in message
    assert "validate.max_bad_fraction=0.05" in message and str(layout.quarantine) in message
    assert "raise validate.max_bad_fraction" in message and "corrupt_image 2" in message
    assert layout.quarantine.exists() and "FAILED" in layout.validation_markdown.read_text()
    assert not layout.manifest.exists()  # later stages cannot run on the stale one


def test_a_few_bad_rows_pass_under_the_threshold(tmp_path):
    root = tmp_path / "b"
    lines = []
    for index in range(30):
        noise(root / f"{index}.png", size=(24, 24), seed=index)
        lines.append(_line(f"{index}.png", f"Noise picture number {index}."))
    lines.append(_line("missing.png", "Not there."))
    (root / "captions.jsonl").write_bytes(b"".join(lines))
    cfg, layout = _config(tmp_path, root, max_bad_fraction=0.05, num_workers=0), Layout(tmp_path / "artifacts")
    fetch.run(cfg, layout)
    validate.run(cfg, layout)
    assert len(read_manifest(layout.manifest)) == 30
    assert [json.loads(q)["reason"] for q in layout.quarantine.read_text().splitlines()] == ["missing_file"]


def test_image_listed_in_two_splits_goes_to_test(tmp_path):
    path = noise(tmp_path / "a.png", seed=1)
    from clipcap.data.sources import SourceRecord

    records = build_records([SourceRecord("x:1", str(path), "In train.", "c", "s", split="train"),
                             SourceRecord("y:1", str(path), "In test.", "c", "s", split="test")], SplitConfig())
    result = validate_records(records, ValidateConfig(min_image_side=8))
    assert result.manifest["split"].tolist() == ["test"]
    assert result.manifest["captions"].tolist() == [["In train.", "In test."]]


def test_unreadable_rows_from_the_records_table_keep_their_reason(tmp_path):
    records = pd.DataFrame([{"record": "f:1", "image_id": "", "path": "", "caption": "", "category": "c",
                             "source": "s", "split": "", "domain": None, "problem": "invalid_json",
                             "detail": "Expecting value at column 1"}])
    result = validate_records(records, ValidateConfig())
    assert result.quarantine["reason"].tolist() == ["invalid_json"] and len(result.manifest) == 0
    assert not result.success and "All 1 input rows were quarantined" in result.failure_message("q", "r")


def test_no_input_rows_fails_with_a_clear_message():
    records = pd.DataFrame(columns=["record", "image_id", "path", "caption", "category", "source", "split", "domain",
                                    "problem", "detail"])
    result = validate_records(records, ValidateConfig())
    assert not result.success and result.records == 0 and len(result.manifest) == 0
    assert result.failure_message("q", "r").startswith("No input rows at all")


def test_a_name_too_long_for_the_file_system_is_quarantined_not_fatal(tmp_path):
    root = tmp_path / "b"
    noise(root / "a.png", size=(24, 24))
    (root / "captions.jsonl").write_bytes(_line("a.png", "A fine picture.") + _line("x" * 5000 + ".png", "Too long."))
    result = validate_records(build_records(iter_folder(root), SplitConfig()), ValidateConfig(min_image_side=8))
    assert result.quarantine["reason"].tolist() == ["unreadable_file"] and result.clean_records == 1


def test_a_huge_caption_line_is_quarantined_without_being_held(tmp_path):
    """A 50 MB captions.jsonl line: skipped in chunks (never decoded whole), quarantined with its size;
    a merely long caption (under the line limit) is cut in quarantine.jsonl, its length kept."""
    import tracemalloc

    root = tmp_path / "b"
    noise(root / "a.png", size=(24, 24))
    noise(root / "b.png", size=(24, 24))
    with (root / "captions.jsonl").open("wb") as handle:
        handle.write(_line("a.png", "A fine picture."))
        handle.write(b'{"image": "b.png", "caption": "' + b"x" * 50_000_000 + b'"}\n')
        handle.write(_line("b.png", "y" * 5000))
    tracemalloc.start()
    try:
        records = build_records(iter_folder(root), SplitConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result = validate_records(records, ValidateConfig(min_image_side=8))
    assert result.quarantine["reason"].tolist() == ["line_too_long", "caption_too_long"]
    assert "50000034 bytes" in result.quarantine["detail"].iloc[0]
    assert result.clean_records == 1
    assert peak < 10_000_000  # reading the 50 MB line never held it whole
    out = tmp_path / "quarantine.jsonl"
    write_quarantine(result.quarantine, out)
    long_row = json.loads(out.read_text().splitlines()[1])
    assert len(long_row["caption"]) == 2003 and long_row["caption_chars"] == 5000

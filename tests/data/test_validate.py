import pandas as pd

from clipcap.config import SplitConfig, ValidateConfig
from clipcap.data.manifest import build_manifest
from clipcap.data.sources import CaptionedImage
from clipcap.data.validate import validate_manifest


def test_clean_manifest_passes(make_image):
    items = [CaptionedImage(make_image(f"{i}.png", color=(i, i, i)), (f"A grey square {i}.",), "shapes", "t")
             for i in range(5)]
    report = validate_manifest(build_manifest(items, SplitConfig()), ValidateConfig())
    assert report.success, report.summary()
    assert report.rows == 5 and len(report.expectations) >= 8


def test_bad_rows_are_named_with_reasons(make_image, tmp_path):
    good = CaptionedImage(make_image("good.png"), ("A red card.",), "x", "t")
    tiny = CaptionedImage(make_image("tiny.png", color=(1, 1, 1), size=(3, 3)), ("A dot.",), "x", "t")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    corrupt = CaptionedImage(broken, ("Broken.",), "x", "t")
    missing = CaptionedImage(tmp_path / "nowhere.png", ("Missing.",), "x", "t")
    empty = CaptionedImage(make_image("empty.png", color=(2, 2, 2)), ("",), "x", "t")
    frame = build_manifest([good, tiny, corrupt, missing, empty], SplitConfig())
    report = validate_manifest(frame, ValidateConfig(min_image_side=8))
    assert not report.success
    reasons = {f.path.rsplit("/", 1)[-1]: " ".join(f.reasons) for f in report.failures}
    assert set(reasons) == {"tiny.png", "broken.png", "nowhere.png", "empty.png"}
    assert "smaller than validate.min_image_side=8" in reasons["tiny.png"]
    assert "does not decode" in reasons["broken.png"]
    assert "not found" in reasons["nowhere.png"]
    assert "min_caption_chars" in reasons["empty.png"]
    summary = report.summary()
    assert "4 of 5 manifest rows failed" in summary and "nowhere.png" in summary
    assert "FAILED" in report.to_markdown()


def test_duplicate_ids_and_unknown_split_fail_expectations(make_image):
    items = [CaptionedImage(make_image("a.png"), ("A red card.",), "x", "t")]
    frame = build_manifest(items, SplitConfig())
    frame = pd.concat([frame, frame.assign(split="holdout")], ignore_index=True)
    report = validate_manifest(frame, ValidateConfig())
    failed = {e["expectation"] for e in report.expectations if not e["success"]}
    assert failed == {"expect_column_values_to_be_unique", "expect_column_values_to_be_in_set"}
    assert [f.row for f in report.failures] == [0, 1]

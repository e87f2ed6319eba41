"""Captions are read in Unicode NFC whatever the source: one text is one string to the validate stage's
duplicate and repeat checks (and to training), however it was typed."""

from __future__ import annotations

import json
import unicodedata

from clipcap.config import SplitConfig, ValidateConfig
from clipcap.data.manifest import build_records
from clipcap.data.sources import SourceRecord, iter_folder, iter_tuxpaint
from clipcap.data.validate import validate_records

NFC, NFD = unicodedata.normalize("NFC", "Un café crème."), unicodedata.normalize("NFD", "Un café crème.")


def test_every_source_record_holds_its_caption_in_nfc():
    assert NFC != NFD
    assert SourceRecord("x:1", "a.png", NFD, "c", "s").caption == NFC
    assert SourceRecord("x:1", "a.png", "plain ascii", "c", "s").caption == "plain ascii"


def test_the_validate_stage_counts_an_nfd_copy_of_a_caption_as_a_duplicate(tmp_path, make_image):
    make_image("batch/a.png")
    (tmp_path / "batch" / "captions.jsonl").write_text(
        "".join(json.dumps({"image": "a.png", "caption": c}) + "\n" for c in (NFC, NFD, "A cup on a table.")))
    records = build_records(iter_folder(tmp_path / "batch"), SplitConfig())
    result = validate_records(records, ValidateConfig(max_bad_fraction=0.5, num_workers=0))
    assert result.reason_counts == {"duplicate": 1}
    assert list(result.manifest["captions"][0]) == [NFC, "A cup on a table."]


def test_tuxpaint_descriptions_are_read_in_nfc(tmp_path, make_image):
    make_image("stamps/food/cafe.png")
    (tmp_path / "stamps" / "food" / "cafe.txt").write_bytes(NFD.encode() + b"\n")
    assert [r.caption for r in iter_tuxpaint(tmp_path / "stamps")] == [NFC]

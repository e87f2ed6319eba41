"""The Open Clip Art Library source (PNG + the title in its SVG twin) and the quarantine reasons for its noisy
titles (boilerplate, uninformative and repeated captions), on generated PNG + SVG pairs."""

from __future__ import annotations

import dataclasses

import json
import os
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from imagefiles import noise

from clipcap.config import Config, ConfigError, DatasetConfig, ValidateConfig, config_from_dict, load_config
from clipcap.data.collect import collect_records
from clipcap.data.manifest import read_manifest
from clipcap.data.openclipart import caption_from_title, iter_openclipart, read_metadata
from clipcap.data.sources import SourceError
from clipcap.data.validate import REASONS, uninformative
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.stages import fetch, validate

ROOT = Path(__file__).resolve().parents[2]
NO_BATCHES = "/nonexistent-batches"


def svg_text(title: str, description: str = "", creator: str = "Some Author") -> str:
    """An SVG like the library's: the work's title and description beside the agents' titles, then a drawing."""
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org"><dc:title>Open Clip Art Library</dc:title>
        </cc:Agent></dc:publisher>
        <dc:title>{escape(title)}</dc:title>
        <dc:description>{escape(description)}</dc:description>
        <dc:creator><cc:Agent><dc:title>{escape(creator)}</dc:title></cc:Agent></dc:creator>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect width="10" height="10"/>
</svg>
"""


def clip(root: Path, relative: str, title: str, description: str = "", seed: int = 0) -> Path:
    """``png/<relative>.png`` (random pixels) and its twin ``svg/<relative>.svg``."""
    png = noise(root / "png" / f"{relative}.png", size=(24, 24), seed=seed)
    svg = root / "svg" / f"{relative}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(svg_text(title, description))
    return png


@pytest.mark.parametrize(("title", "caption"), [
    ("russian_federation", "Russian federation."),             # underscores
    ("Rana03", "Rana."),                                       # a trailing number
    ("CFbulb-lit", "CF bulb lit."),                            # an acronym run, a hyphen
    ("BlueMan#105", "Blue man."),                              # camel case, a '#' number
    ("AIGA_Symbol_Signs", "AIGA Symbol Signs."),               # capitals that are not camel-case boundaries stay
    ("Clipart by Nicu Buculei - jigsaw_red_10", "Jigsaw red."),  # the attribution prefix goes
    ("books-aj.svg", "Books aj."),                             # a file extension goes
    ("Leone 01", "Leone."),                                    # a zero-padded number after a space
    ("international maritime signal flag 5", "International maritime signal flag 5."),  # a real number stays
    ("France - Brittany", "France - Brittany."),               # proper nouns keep their capitals
    ("  Bullet   Hole ", "Bullet Hole."),
    ("Is it a cat?", "Is it a cat?"),                          # ends with its own punctuation
    ("L&Atilde;&copy;zard", "Lézard."),                        # entities and UTF-8 read as Latin-1
    ("Gelato all&#39;italiana", "Gelato all'italiana."),
    ("Ale\x9a", "Aleš."),                                      # cp1252 read as Latin-1
    ("2004", "2004."),                                         # nothing else left: kept (and judged by validate)
    ("", ""), ("   ", ""), ("Clipart by Someone - ", ""),
])
def test_titles_become_captions(title, caption):
    assert caption_from_title(title) == caption


def test_metadata_is_the_works_title_not_an_agents(tmp_path):
    svg = tmp_path / "a.svg"
    svg.write_text(svg_text("A red apple", "Drawn with Inkscape", creator="Jane Doe"))
    assert read_metadata(svg) == ("A red apple", "Drawn with Inkscape")
    svg.write_text(svg_text("", ""))
    assert read_metadata(svg) == ("", "")


def test_source_yields_one_record_per_png_with_its_category_and_problems(tmp_path):
    clip(tmp_path, "animals/cats/sleeping_cat_01", "sleeping_cat", seed=1)
    clip(tmp_path, "food/apple", "", description="A green apple\nwith a leaf", seed=2)
    noise(tmp_path / "png" / "food" / "lonely.png", size=(24, 24), seed=3)             # no SVG twin
    noise(tmp_path / "png" / "shapes" / "broken.png", size=(24, 24), seed=4)
    (tmp_path / "svg" / "shapes").mkdir(parents=True)
    (tmp_path / "svg" / "shapes" / "broken.svg").write_text("<svg><metadata><dc:title>cut")  # does not parse
    noise(tmp_path / "png" / "top.png", size=(24, 24), seed=5)
    (tmp_path / "svg" / "top.svg").write_text(svg_text("top level"))
    records = {Path(r.path).name: r for r in iter_openclipart(tmp_path)}
    assert len(records) == 5
    cat = records["sleeping_cat_01.png"]
    assert (cat.caption, cat.category, cat.source, cat.problem) == ("Sleeping cat.", "animals", "openclipart", None)
    assert cat.origin == f"{tmp_path}/svg/animals/cats/sleeping_cat_01.svg:title"
    apple = records["apple.png"]                                 # an empty title: the description's first line
    assert apple.caption == "A green apple." and apple.origin.endswith("apple.svg:description")
    assert records["lonely.png"].problem == "missing_field" and "openclipart-svg" in records["lonely.png"].detail
    assert records["broken.png"].problem == "invalid_metadata" and "broken.svg" in records["broken.png"].detail
    assert records["top.png"].category == "other"
    assert all(problem in REASONS for problem in ("missing_field", "invalid_metadata"))


def test_missing_packages_say_how_to_install(tmp_path):
    for missing in ("png", "svg"):
        root = tmp_path / missing
        (root / ("svg" if missing == "png" else "png")).mkdir(parents=True)
        with pytest.raises(SourceError, match=f"{missing} is missing .*apt-get install --no-install-recommends "
                                              "openclipart-png openclipart-svg"):
            list(collect_records(DatasetConfig(source="openclipart", root=str(root), batches_dir=NO_BATCHES)))


def test_collect_dispatches_and_limits(tmp_path):
    for index in range(4):
        clip(tmp_path, f"animals/bird_{index}", f"Bird number {chr(65 + index)}", seed=index)
    records = list(collect_records(DatasetConfig(source="openclipart", root=str(tmp_path), limit=3,
                                                 batches_dir=NO_BATCHES)))
    assert [r.caption for r in records] == ["Bird number A.", "Bird number B.", "Bird number C."]


@pytest.mark.parametrize(("caption", "why"), [
    ("Fc.", "without a vowel"), ("Pfd.", "without a vowel"), ("Bee3.", "code"), ("IMG_0042.", "code"),
    ("cat.png.", "file name"), ("2004.", "number"),
    ("Lighthouse.", ""), ("TV.", ""), ("A cat.", ""), ("Two words.", ""), ("猫狗.", ""), ("Crème.", ""), ("Fly.", ""),
])
def test_uninformative_captions_are_one_token_non_words(caption, why):
    found = uninformative(caption)
    if why:
        assert why in found
    else:
        assert found == ""


# ---------------------------------------------------------------- the stages on a small library
BOILERPLATE = (r"\bcollection\b(?! of)", r"\btheme\b")


def library(root: Path) -> dict[str, str]:
    """A small library: {png name: the reason validate must give it, or the caption it must keep}."""
    expected = {}
    for index in range(3):                                       # one title on three images: a series name
        clip(root, f"shapes/star_{index}", "gramastar", seed=10 + index)
        expected[f"star_{index}.png"] = "repeated_caption"
    for index in range(2):                                       # two images: not over the limit of 2
        clip(root, f"animals/crawfish_{index}", "Crawfish", seed=20 + index)
        expected[f"crawfish_{index}.png"] = "Crawfish."
    for index in range(3):                                       # boilerplate wins over repeated
        clip(root, f"computer/icon_{index}", "Part of the Flat Icon Collection (Wed Aug 25 2004)", seed=30 + index)
        expected[f"icon_{index}.png"] = "boilerplate_caption"
    clip(root, "computer/lemon", "Lemon SVG theme", seed=40)
    expected["lemon.png"] = "boilerplate_caption"
    clip(root, "office/stamps", "Collection of Passport Stamps", seed=41)   # the negative lookahead keeps it
    expected["stamps.png"] = "Collection of Passport Stamps."
    clip(root, "special/fc23", "Clipart by Nicu Buculei - fc23", seed=42)
    expected["fc23.png"] = "uninformative_caption"
    clip(root, "geography/russia", "russian_federation", seed=43)
    expected["russia.png"] = "Russian federation."
    clip(root, "special/nothing", "", seed=44)
    expected["nothing.png"] = "empty_caption"
    # the same picture linked into a second category: one image, its second row a duplicate; it does not make
    # "Sleeping cat." a caption of two images
    clip(root, "animals/cat", "Sleeping Cat", seed=45)
    clip(root, "people/cat", "Sleeping Cat", seed=45).unlink()
    os.symlink("../animals/cat.png", root / "png" / "people" / "cat.png")
    clip(root, "animals/cat_copy", "Sleeping_Cat", seed=45)       # the same bytes and caption, another name
    expected["cat.png"] = "Sleeping Cat."
    return expected


def test_fetch_and_validate_quarantine_noisy_titles_with_reasons(tmp_path):
    root = tmp_path / "openclipart"
    expected = library(root)
    cfg = Config(dataset=DatasetConfig(source="openclipart", root=str(root), batches_dir=NO_BATCHES),
                 validate=ValidateConfig(min_image_side=8, max_bad_fraction=0.9, max_caption_repeats=2,
                                         boilerplate_patterns=BOILERPLATE))
    layout = Layout(tmp_path / "artifacts")
    records = fetch.run(cfg, layout)
    assert len(records) == len(expected) + 2                     # + the symlink and the copy of cat.png
    validate.run(cfg, layout)
    quarantine = [json.loads(line) for line in layout.quarantine.read_text().splitlines()]
    reasons = {Path(q["path"]).parent.name + "/" + Path(q["path"]).name: q["reason"] for q in quarantine}
    assert reasons.pop("people/cat.png") == "duplicate" and reasons.pop("animals/cat_copy.png") == "duplicate"
    assert {key.split("/")[1]: reason for key, reason in reasons.items()} == {
        name: reason for name, reason in expected.items() if reason in REASONS}
    manifest = read_manifest(layout.manifest)
    kept = {Path(p).name: captions for p, captions in zip(manifest["path"], manifest["captions"])}
    assert kept == {name: [caption] for name, caption in expected.items() if caption not in REASONS}
    assert set(manifest["source"]) == {"openclipart"}
    detail = {Path(q["path"]).name: q["detail"] for q in quarantine}
    assert detail["star_0.png"] == "caption 'Gramastar.' is given to 3 images, more than validate.max_caption_repeats=2"
    assert detail["icon_0.png"].endswith(r"matches the boilerplate pattern '\bcollection\b(?! of)' "
                                         "(validate.boilerplate_patterns)")
    assert detail["fc23.png"] == "caption 'Fc.' is one token: Latin letters without a vowel, not a word"
    report = layout.validation_markdown.read_text()
    for reason in ("repeated_caption", "boilerplate_caption", "uninformative_caption"):
        assert f"| {reason} |" in report and REASONS[reason] in report


def test_new_checks_are_off_by_default_except_uninformative(tmp_path):
    root = tmp_path / "openclipart"
    library(root)
    cfg = Config(dataset=DatasetConfig(source="openclipart", root=str(root), batches_dir=NO_BATCHES),
                 validate=ValidateConfig(min_image_side=8, max_bad_fraction=0.9))
    layout = Layout(tmp_path / "artifacts")
    fetch.run(cfg, layout)
    validate.run(cfg, layout)
    report = json.loads(layout.validation_report.read_text())
    assert report["reasons"] == {"duplicate": 2, "empty_caption": 1, "uninformative_caption": 1}


@pytest.mark.parametrize(("params", "key"), [
    ({"boilerplate_patterns": ["ok", "(unclosed"]}, "validate.boilerplate_patterns[1]"),
    ({"boilerplate_patterns": "collection"}, "validate.boilerplate_patterns"),
    ({"max_caption_repeats": -1}, "validate.max_caption_repeats"),
])
def test_bad_new_validate_params_name_the_key(params, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"validate": params})
    assert str(err.value).startswith(key), err.value


def test_the_openclipart_dataset_changes_only_the_source_validation_epochs_and_rerank_margin():
    cfg = load_config(ROOT / "params.yaml", "openclipart")
    assert (cfg.dataset.name, cfg.dataset.source, cfg.dataset.root) == ("openclipart", "openclipart", None)
    assert cfg.dataset.batches == Path("data/openclipart")
    assert cfg.validate.max_caption_repeats > 6 and cfg.validate.boilerplate_patterns  # tuxpaint repeats 6 at most
    default = Config()
    assert cfg.train == dataclasses.replace(default.train, epochs=cfg.train.epochs)  # 2,586 captions: fewer epochs
    # its validation split chose margin 0 (the LM's rewrites help there), tuxpaint's a larger one
    assert cfg.evaluate.decoding.rerank_margin == 0 < default.evaluate.decoding.rerank_margin
    assert cfg.evaluate == dataclasses.replace(
        default.evaluate, decoding=dataclasses.replace(default.evaluate.decoding, rerank_margin=0.0))
    assert [cfg.split, cfg.encoder, cfg.lm, cfg.mapper, cfg.retrieval, cfg.register] == [
        default.split, default.encoder, default.lm, default.mapper, default.retrieval, default.register]

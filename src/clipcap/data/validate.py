"""Validation: every input row is either kept (clean manifest) or quarantined with one reason.

:func:`validate_records` checks the records table written by ``fetch`` (one row per input
row, see :mod:`clipcap.data.manifest`) in this order, the first failing check giving the row's
reason (each check is a pass over the rows no earlier pass quarantined, returning its verdicts):

1. problems met while reading (``invalid_utf8``, ``invalid_json``, ``invalid_csv``,
   ``missing_field``, ``unsafe_path``, ``bad_split``, ``unreadable_file``);
2. the image, checked once per distinct file (:func:`check_image`): ``missing_file``,
   ``empty_file``, ``not_an_image``, ``too_large`` (width x height from the header above
   ``validate.max_image_pixels``: never decoded), ``bad_shape`` (the longer side over
   ``validate.max_aspect_ratio`` times the shorter: never decoded), ``too_small``, ``corrupt_image`` (does not
   decode, e.g. truncated), ``unsupported_mode`` (cannot become RGB);
3. a Great Expectations 1.x suite on the captions and splits, a row failing several
   expectations getting the first of ``control_characters``, ``empty_caption``,
   ``caption_too_short``, ``caption_too_long``, ``bad_split``;
4. what the caption says (:func:`_content_problems`): ``boilerplate_caption`` (matches one of
   ``validate.boilerplate_patterns``: a collection or theme name), ``uninformative_caption`` (one
   token that is not a word: a file name, code or number), ``repeated_caption`` (the same caption,
   ignoring case and the final full stop, given to more than ``validate.max_caption_repeats``
   distinct images: a series name, not a description; every such row goes);
5. ``duplicate``: the same image (by content) with the same caption again; the first one stays.

Captions are kept with their whitespace normalised (runs of spaces, tabs and newlines become
one space; leading and trailing whitespace dropped). The good rows are grouped into the clean
manifest (one row per image), which a second suite checks (no nulls, unique sha256 ids, known
splits, at least one caption each). The stage fails when the quarantined fraction exceeds
``validate.max_bad_fraction``, when no row is left, or when the manifest fails its suite.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import UnidentifiedImageError

from clipcap.config import ValidateConfig
from clipcap.data import sources
from clipcap.images import ImageShapeError, ImageTooLargeError, apply_orientation, open_image, to_rgb
from clipcap.data.manifest import SPLITS, UNREADABLE_FILE, group_records
from clipcap.errors import ClipcapError
from clipcap.fileio import write_text

log = logging.getLogger(__name__)

MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
BAD_SHAPE = "bad_shape"
CORRUPT_IMAGE = "corrupt_image"
UNSUPPORTED_MODE = "unsupported_mode"
CONTROL_CHARACTERS = "control_characters"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
BOILERPLATE_CAPTION = "boilerplate_caption"
UNINFORMATIVE_CAPTION = "uninformative_caption"
REPEATED_CAPTION = "repeated_caption"
DUPLICATE = "duplicate"

# Every reason a row can be quarantined for, and how to fix it (the report prints these).
REASONS = {
    sources.INVALID_UTF8: "save the captions file as UTF-8",
    sources.INVALID_JSON: 'make each line one JSON object: {"image": "a.jpg", "caption": "..."}',
    sources.INVALID_CSV: "quote CSV fields that hold commas or quotes; one row per line",
    sources.LINE_TOO_LONG: "a captions.jsonl line is over a megabyte: write one short caption per line",
    sources.MISSING_FIELD: "give every row an image path and a caption",
    sources.UNSAFE_PATH: "give image paths relative to the dataset folder, without '..', a leading '/' or "
                         "symlinks pointing outside it",
    sources.BAD_SPLIT: "use one of the splits train, val, test (Karpathy: also restval)",
    sources.INVALID_METADATA: "the image's metadata file (openclipart: the SVG twin holding the title) does not "
                              "parse: repair or re-export it",
    UNREADABLE_FILE: "make the image file readable (permissions)",
    MISSING_FILE: "add the image file, or remove its row",
    EMPTY_FILE: "the file is empty (0 bytes): copy or download it again",
    NOT_AN_IMAGE: "the file is not an image (text, HTML error page...): replace it with the real image",
    TOO_LARGE: "downscale the image, or raise validate.max_image_pixels",
    TOO_SMALL: "use a larger image, or lower validate.min_image_side",
    BAD_SHAPE: "crop the strip to the object, or raise validate.max_aspect_ratio",
    CORRUPT_IMAGE: "the image is truncated or damaged: copy, export or download it again",
    UNSUPPORTED_MODE: "convert the image to RGB (or grayscale) and save it again",
    CONTROL_CHARACTERS: "remove control characters (escape codes, NUL, bell...) from the caption",
    EMPTY_CAPTION: "write a caption, or remove the row",
    CAPTION_TOO_SHORT: "write a longer caption, or lower validate.min_caption_chars",
    CAPTION_TOO_LONG: "shorten the caption, or raise validate.max_caption_chars",
    BOILERPLATE_CAPTION: "the caption names a collection, theme or author rather than the picture: write one that "
                         "describes the image, or narrow validate.boilerplate_patterns",
    UNINFORMATIVE_CAPTION: "the caption is one token that is not a word (a file name, code or number): write one "
                           "that describes the image",
    REPEATED_CAPTION: "the same caption is given to more than validate.max_caption_repeats images (a series or "
                      "collection name): write captions that tell the images apart, or raise the limit (0 = off)",
    DUPLICATE: "the same image with the same caption appears earlier: remove the repeated row",
}
CONTROL_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"  # C0 and C1 controls except tab, newline, return
_FILE_EXTENSION = re.compile(r"\.(svg|png|jpe?g|gif|bmp|tiff?|webp)$", re.IGNORECASE)
QUARANTINE_COLUMNS = ["record", "reason", "detail", "path", "caption", "source"]


class DataValidationError(ClipcapError, RuntimeError):
    """Too much of the data failed validation; the message says how much, where it is listed and how to fix it."""


def normalize_caption(text: str) -> str:
    """Whitespace runs (spaces, tabs, newlines) become one space; the ends are stripped."""
    return " ".join(text.split())


# ---------------------------------------------------------------- images
def check_image(path: str | Path, cfg: ValidateConfig) -> tuple[str, str] | None:
    """``(reason, detail)`` when the image at ``path`` is unusable, None when it is fine.

    The header is read first: an image over ``cfg.max_image_pixels`` pixels, longer than
    ``cfg.max_aspect_ratio`` times its width (or wider) or under ``cfg.min_image_side`` is refused
    without decoding. Then the image is decoded and converted
    exactly as :func:`clipcap.data.images.load_rgb` does for training and inference.
    """
    file = Path(path)
    try:
        if not file.exists():
            return MISSING_FILE, f"image file not found: {file}"
        if not file.is_file():
            return MISSING_FILE, f"{file} is not a regular file"
        if file.stat().st_size == 0:
            return EMPTY_FILE, f"{file} is empty (0 bytes)"
    except OSError as err:
        return UNREADABLE_FILE, f"cannot read {file}: {err}"
    try:
        image = open_image(file, cfg.max_image_pixels, cfg.max_aspect_ratio)
    except ImageTooLargeError as err:
        return TOO_LARGE, str(err).replace("max_image_pixels", "validate.max_image_pixels")
    except ImageShapeError as err:
        return BAD_SHAPE, str(err).replace("max_aspect_ratio", "validate.max_aspect_ratio")
    except UnidentifiedImageError:
        return NOT_AN_IMAGE, f"{file} is not an image format PIL can read"
    except Exception as err:  # PIL raises many types on damaged headers
        return CORRUPT_IMAGE, f"{file}: header does not parse ({type(err).__name__}: {err})"
    with image:
        width, height = image.size
        if min(width, height) < cfg.min_image_side:
            return TOO_SMALL, f"{file} is {width}x{height}, smaller than validate.min_image_side={cfg.min_image_side}"
        try:
            image.load()
        except Exception as err:
            return CORRUPT_IMAGE, f"{file} does not decode ({type(err).__name__}: {err})"
        try:
            to_rgb(apply_orientation(image))
        except Exception as err:
            return UNSUPPORTED_MODE, (f"{file} (mode {image.mode}) cannot be converted to RGB "
                                      f"({type(err).__name__}: {err})")
    return None


def check_images(paths: list[str], cfg: ValidateConfig) -> list[tuple[str, str] | None]:
    """:func:`check_image` for each path, in ``cfg.num_workers`` threads (PIL decodes without the GIL)."""
    check: Callable[[str], tuple[str, str] | None] = lambda p: check_image(p, cfg)  # noqa: E731
    if cfg.num_workers == 0 or len(paths) < 2:
        return [check(p) for p in paths]
    with ThreadPoolExecutor(max_workers=cfg.num_workers, thread_name_prefix="validate") as pool:
        return list(pool.map(check, paths))


# ---------------------------------------------------------------- Great Expectations
def _record_expectations(cfg: ValidateConfig) -> list:
    import great_expectations as gx

    e = gx.expectations
    return [
        e.ExpectColumnValuesToNotMatchRegex(column="caption_raw", regex=CONTROL_REGEX,
                                            meta={"reason": CONTROL_CHARACTERS}),
        e.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1, meta={"reason": EMPTY_CAPTION}),
        e.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=cfg.min_caption_chars,
                                              meta={"reason": CAPTION_TOO_SHORT}),
        e.ExpectColumnValueLengthsToBeBetween(column="caption", max_value=cfg.max_caption_chars,
                                              meta={"reason": CAPTION_TOO_LONG}),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta={"reason": sources.BAD_SPLIT}),
    ]


def _manifest_expectations() -> list:
    import great_expectations as gx

    e = gx.expectations
    return [
        *(e.ExpectColumnValuesToNotBeNull(column=c) for c in ("image_id", "path", "category", "source", "split")),
        e.ExpectColumnValuesToBeUnique(column="image_id"),
        e.ExpectColumnValuesToMatchRegex(column="image_id", regex=r"^[0-9a-f]{64}$"),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        e.ExpectColumnValuesToBeBetween(column="n_captions", min_value=1),
    ]


class _Suites:
    """One ephemeral GX context running named suites on pandas frames."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_pandas("clipcap")

    def run(self, name: str, frame: pd.DataFrame, expectations: list) -> list[dict]:
        """One dict per expectation: its type, column, reason (meta), success and failing index labels."""
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = self.context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
        out = []
        for item in result.results:
            config = item.expectation_config
            failing = [int(i) for i in (item.result.get("unexpected_index_list") or [])]
            out.append({"suite": name, "expectation": config.type, "column": config.kwargs.get("column"),
                        "reason": (config.meta or {}).get("reason"), "success": bool(item.success),
                        "failing_rows": len(failing), "failing_index": failing})
        return out


# ---------------------------------------------------------------- the result
@dataclass
class ValidationResult:
    records: int                    # input rows
    manifest: pd.DataFrame          # the clean manifest: one row per image
    quarantine: pd.DataFrame        # one row per rejected input row, with its reason
    max_bad_fraction: float
    expectations: list[dict] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        return len(self.quarantine)

    @property
    def clean_records(self) -> int:
        return self.records - self.quarantined

    @property
    def bad_fraction(self) -> float:
        return self.quarantined / self.records if self.records else 0.0

    @property
    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(self.quarantine["reason"]).most_common())

    @property
    def manifest_ok(self) -> bool:
        return all(e["success"] for e in self.expectations if e["suite"] == "manifest")

    @property
    def success(self) -> bool:
        return len(self.manifest) > 0 and self.bad_fraction <= self.max_bad_fraction and self.manifest_ok

    def reasons_text(self) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in self.reason_counts.items()) or "none"

    def failure_message(self, quarantine_path: str | Path, report_path: str | Path) -> str:
        where = (f"The quarantined rows, one reason each, are in {quarantine_path} (summary: {report_path}).")
        if self.records == 0:
            return "No input rows at all: the dataset source and data/ yielded nothing; check dataset.* in params.yaml."
        if not self.manifest_ok:
            failed = [f"{e['expectation']} on {e['column']}" for e in self.expectations
                      if e["suite"] == "manifest" and not e["success"]]
            return f"The clean manifest failed its expectations ({'; '.join(failed)}). {where}"
        if len(self.manifest) == 0:
            return (f"All {self.records} input rows were quarantined ({self.reasons_text()}). {where} "
                    "Fix the data (or the dataset.* paths in params.yaml) and run again.")
        return (f"{self.quarantined} of {self.records} input rows ({self.bad_fraction:.1%}) were quarantined, more "
                f"than validate.max_bad_fraction={self.max_bad_fraction:g} ({self.max_bad_fraction:.1%}). "
                f"By reason: {self.reasons_text()}. {where} Fix or remove those rows and images (user batches live "
                "under data/: then 'dvc add data'), or raise validate.max_bad_fraction in params.yaml to accept "
                "the loss; then run again.")

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "input_rows": self.records,
            "clean_rows": self.clean_records,
            "clean_images": len(self.manifest),
            "quarantined_rows": self.quarantined,
            "bad_fraction": round(self.bad_fraction, 6),
            "max_bad_fraction": self.max_bad_fraction,
            "reasons": self.reason_counts,
            "splits": {s: int((self.manifest["split"] == s).sum()) for s in SPLITS},
            "expectations": [{k: v for k, v in e.items() if k != "failing_index"} for e in self.expectations],
        }

    def to_markdown(self, quarantine_path: str | Path = "quarantine.jsonl", max_rows: int = 50) -> str:
        status = "PASSED" if self.success else "FAILED"
        splits = ", ".join(f"{s} {int((self.manifest['split'] == s).sum())}" for s in SPLITS)
        lines = [
            f"# Data validation: {status}", "",
            f"- input rows: {self.records}",
            f"- clean rows: {self.clean_records}, grouped into {len(self.manifest)} images ({splits})",
            f"- quarantined rows: {self.quarantined} ({self.bad_fraction:.2%}; the stage fails above "
            f"validate.max_bad_fraction = {self.max_bad_fraction:.2%})",
            f"- quarantine file (one JSON object per row, with its reason): `{quarantine_path}`", "",
            "## Quarantined rows by reason", "",
        ]
        if self.quarantined:
            lines += ["| reason | rows | how to fix |", "|---|---|---|"]
            lines += [f"| {r} | {n} | {REASONS.get(r, '')} |" for r, n in self.reason_counts.items()]
        else:
            lines.append("None.")
        lines += ["", "## Expectations (Great Expectations)", "",
                  "| suite | expectation | column | result | failing rows |", "|---|---|---|---|---|"]
        for e in self.expectations:
            lines.append(f"| {e['suite']} | {e['expectation']} | {e['column']} | {'ok' if e['success'] else 'FAIL'} "
                         f"| {e['failing_rows']} |")
        if self.quarantined:
            lines += ["", f"## Quarantined rows (first {min(max_rows, self.quarantined)} of {self.quarantined})", "",
                      "| row | reason | detail | caption |", "|---|---|---|---|"]
            for row in self.quarantine.head(max_rows).itertuples(index=False):
                cells = [f"`{row.record}`", row.reason, sources.shown(row.detail, 160), sources.shown(row.caption, 60)]
                lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return sources.visible(text).replace("|", "\\|")


QUARANTINE_CAPTION_CHARS = 2000  # a longer caption is cut in quarantine.jsonl (its length is kept)


def write_quarantine(frame: pd.DataFrame, path: str | Path) -> None:
    """One JSON object per quarantined row: record, reason, detail, path, caption, source (a caption
    longer than QUARANTINE_CAPTION_CHARS is cut, with ``caption_chars`` giving its length)."""
    def entry(row: dict) -> str:
        caption = row.get("caption")
        if isinstance(caption, str) and len(caption) > QUARANTINE_CAPTION_CHARS:
            row = {**row, "caption": caption[:QUARANTINE_CAPTION_CHARS] + "...", "caption_chars": len(caption)}
        return json.dumps(row, ensure_ascii=False) + "\n"

    write_text(path, "".join(entry(row) for row in frame[QUARANTINE_COLUMNS].to_dict("records")))


# ---------------------------------------------------------------- validation
Verdicts = dict[int, tuple[str, str]]  # row index -> (reason, detail) of the rows a pass quarantines


def validate_records(records: pd.DataFrame, cfg: ValidateConfig) -> ValidationResult:
    """Quarantine the bad input rows (one reason each) and group the good ones into the clean manifest.

    Each pass looks only at the rows no earlier pass has quarantined and returns its own verdicts, so the
    verdicts never overlap and the first failing check gives a row's reason.
    """
    records = records.reset_index(drop=True)
    raw = records["caption"].fillna("").astype(str)
    captions = raw.map(normalize_caption)
    suites = _Suites()

    verdicts = _reading_problems(records)
    verdicts |= _image_problems(records, _clean(records, verdicts), cfg)
    found, record_results = _caption_problems(records, raw, captions, _clean(records, verdicts), suites, cfg)
    verdicts |= found
    verdicts |= _content_problems(records, captions, _clean(records, verdicts), cfg)
    verdicts |= _duplicates(records, captions, _clean(records, verdicts))

    good = _clean(records, verdicts)
    manifest = group_records(records.loc[good].assign(caption=captions[good]))
    result = ValidationResult(len(records), manifest, _quarantine(records, verdicts), cfg.max_bad_fraction,
                              record_results + _manifest_results(manifest, suites))
    log.info("validated %d input rows: %d clean (%d images), %d quarantined (%.1f%%): %s", result.records,
             result.clean_records, len(manifest), result.quarantined, 100 * result.bad_fraction, result.reasons_text())
    return result


def _clean(records: pd.DataFrame, verdicts: Verdicts) -> list[int]:
    """The rows, in input order, that no pass has quarantined yet."""
    return [i for i in range(len(records)) if i not in verdicts]


def _reading_problems(records: pd.DataFrame) -> Verdicts:
    """1. The problems met while reading, as fetch recorded them."""
    problems = records["problem"].fillna("").astype(str)
    details = records["detail"].fillna("").astype(str)
    return {i: (problems[i], details[i]) for i in range(len(records)) if problems[i]}


def _image_problems(records: pd.DataFrame, rows: list[int], cfg: ValidateConfig) -> Verdicts:
    """2. :func:`check_image` once per distinct file (by content id, or by path when it has none)."""
    keys = {i: records.at[i, "image_id"] or records.at[i, "path"] for i in rows}
    files: dict[str, str] = {}
    for i, key in keys.items():
        files.setdefault(key, records.at[i, "path"])
    log.info("checking %d images (%d threads)", len(files), cfg.num_workers)
    found = dict(zip(files, check_images(list(files.values()), cfg)))
    return {i: found[key] for i, key in keys.items() if found[key]}


def _caption_problems(records: pd.DataFrame, raw: pd.Series, captions: pd.Series, rows: list[int],
                      suites: _Suites, cfg: ValidateConfig) -> tuple[Verdicts, list[dict]]:
    """3. The record suite on the captions and splits of ``rows``, and its results; a row failing several
    expectations gets the reason of the first in :func:`_record_expectations`."""
    if not rows:
        return {}, []
    table = pd.DataFrame({"caption_raw": raw, "caption": captions, "split": records["split"]}).loc[rows]
    expectations = suites.run("records", table, _record_expectations(cfg))
    verdicts: Verdicts = {}
    for e in expectations:
        for i in e["failing_index"]:
            verdicts.setdefault(i, (e["reason"], _caption_detail(e["reason"], captions[i], raw[i], cfg,
                                                                 records.at[i, "split"])))
    return verdicts, expectations


def uninformative(caption: str) -> str:
    """Why ``caption`` (normalised) says nothing about a picture, or "" when it may.

    Only one-token captions are judged: a token holding a digit or an underscore, ending in an image file
    extension, or made of Latin letters without a vowel (``Fc``, ``pfd``; acronyms such as ``TV`` excepted) is not
    a word. Longer captions and real single words ("Lighthouse.") pass; so does non-Latin script.
    """
    tokens = caption.split()
    if len(tokens) != 1:
        return ""
    token = tokens[0].rstrip(".!?")
    if _FILE_EXTENSION.search(token):
        return "a file name"
    if any(ch.isdigit() for ch in token) or "_" in token:
        return "a code, number or file name, not a word"
    letters = "".join(ch for ch in token if ch.isalpha())
    if letters.isascii() and letters and not letters.isupper() and not set(letters.lower()) & set("aeiouy"):
        return "Latin letters without a vowel, not a word"
    return ""


def _repeat_key(caption: str) -> str:
    return caption.casefold().rstrip(".!? ")


def _content_problems(records: pd.DataFrame, captions: pd.Series, rows: list[int], cfg: ValidateConfig) -> Verdicts:
    """4. Boilerplate, uninformative and repeated captions among ``rows`` (the first that applies)."""
    verdicts: Verdicts = {}
    patterns = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate_patterns]
    for i in rows:
        match = next((p for p in patterns if p.search(captions[i])), None)
        if match is not None:
            verdicts[i] = (BOILERPLATE_CAPTION, f"caption {captions[i]!r} matches the boilerplate pattern "
                                                f"'{match.pattern}' (validate.boilerplate_patterns)")
        elif why := uninformative(captions[i]):
            verdicts[i] = (UNINFORMATIVE_CAPTION, f"caption {captions[i]!r} is one token: {why}")
    if cfg.max_caption_repeats:
        left = [i for i in rows if i not in verdicts]
        images: dict[str, set[str]] = {}
        for i in left:
            images.setdefault(_repeat_key(captions[i]), set()).add(records.at[i, "image_id"])
        for i in left:
            count = len(images[_repeat_key(captions[i])])
            if count > cfg.max_caption_repeats:
                verdicts[i] = (REPEATED_CAPTION, f"caption {captions[i]!r} is given to {count} images, more than "
                                                 f"validate.max_caption_repeats={cfg.max_caption_repeats}")
    return verdicts


def _duplicates(records: pd.DataFrame, captions: pd.Series, rows: list[int]) -> Verdicts:
    """5. The same image content with the same normalised caption as an earlier row of ``rows``."""
    first_seen: dict[tuple[str, str], str] = {}
    verdicts: Verdicts = {}
    for i in rows:
        key = (records.at[i, "image_id"], captions[i])
        if key in first_seen:
            verdicts[i] = (DUPLICATE, f"same image and caption as {first_seen[key]}")
        else:
            first_seen[key] = records.at[i, "record"]
    return verdicts


def _quarantine(records: pd.DataFrame, verdicts: Verdicts) -> pd.DataFrame:
    """The quarantined rows in input order, each with its reason and detail."""
    bad = sorted(verdicts)
    return (records.loc[bad]
            .assign(reason=[verdicts[i][0] for i in bad], detail=[verdicts[i][1] for i in bad])[QUARANTINE_COLUMNS]
            .reset_index(drop=True))


def _manifest_results(manifest: pd.DataFrame, suites: _Suites) -> list[dict]:
    """The manifest suite's results (none for an empty manifest)."""
    if not len(manifest):
        return []
    table = manifest.drop(columns=["captions", "domain"]).assign(n_captions=manifest["captions"].map(len))
    return suites.run("manifest", table, _manifest_expectations())


def _caption_detail(code: str, caption: str, raw: str, cfg: ValidateConfig, split: str) -> str:
    if code == CONTROL_CHARACTERS:
        return f"caption holds control characters: {sources.visible(sources.shown(raw, 120))}"
    if code == EMPTY_CAPTION:
        return "caption is empty"
    if code == CAPTION_TOO_SHORT:
        return (f"caption {caption!r} has {len(caption)} characters, fewer than "
                f"validate.min_caption_chars={cfg.min_caption_chars}")
    if code == CAPTION_TOO_LONG:
        return f"caption has {len(caption)} characters, more than validate.max_caption_chars={cfg.max_caption_chars}"
    if code == sources.BAD_SPLIT:
        return f"split {split!r} is not one of {', '.join(SPLITS)}"
    return code

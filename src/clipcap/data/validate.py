"""Validation of the manifest: a Great Expectations 1.x suite plus per-image checks.

:func:`validate_manifest` returns a :class:`ValidationReport` naming every failing row and
the reason; the ``validate`` stage writes it (JSON + Markdown) and fails when it is not clean.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from clipcap.config import ValidateConfig
from clipcap.data.manifest import SPLITS
from clipcap.errors import ClipcapError

log = logging.getLogger(__name__)


class DataValidationError(ClipcapError, RuntimeError):
    """The data failed validation; the message names the failing rows."""


@dataclass
class RowFailure:
    row: int
    image_id: str
    path: str
    reasons: list[str]


@dataclass
class ValidationReport:
    rows: int
    expectations: list[dict] = field(default_factory=list)
    failures: list[RowFailure] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures and all(e["success"] for e in self.expectations)

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "rows": self.rows,
            "failed_rows": len(self.failures),
            "expectations": self.expectations,
            "failures": [asdict(f) for f in self.failures],
        }

    def summary(self, max_rows: int = 20) -> str:
        lines = [f"{len(self.failures)} of {self.rows} manifest rows failed validation:"]
        for failure in self.failures[:max_rows]:
            lines.append(f"  row {failure.row} ({failure.path}): {'; '.join(failure.reasons)}")
        if len(self.failures) > max_rows:
            lines.append(f"  ... and {len(self.failures) - max_rows} more (see the report)")
        lines.append("Fix or remove these images/captions (user batches live under data/), then re-run.")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        lines = [f"# Data validation: {status}", "", f"Rows checked: {self.rows}", "", "## Expectations", ""]
        lines += ["| expectation | column | result | failing rows |", "|---|---|---|---|"]
        for exp in self.expectations:
            lines.append(
                f"| {exp['expectation']} | {exp['column']} | {'ok' if exp['success'] else 'FAIL'} "
                f"| {', '.join(map(str, exp['failing_rows'][:10]))} |"
            )
        lines += ["", "## Failing rows", ""]
        if not self.failures:
            lines.append("None.")
        for failure in self.failures:
            lines.append(f"- row {failure.row} `{failure.path}`: {'; '.join(failure.reasons)}")
        return "\n".join(lines) + "\n"


def _caption_stats(frame: pd.DataFrame) -> pd.DataFrame:
    lengths = frame["captions"].map(lambda cs: [len(str(c).strip()) for c in cs] or [0])
    return frame.assign(
        n_captions=frame["captions"].map(len),
        min_caption_chars=lengths.map(min),
        max_caption_chars=lengths.map(max),
    )


def _expectations(cfg: ValidateConfig) -> list:
    import great_expectations as gx

    e = gx.expectations
    return [
        *(e.ExpectColumnValuesToNotBeNull(column=c) for c in ("image_id", "path", "category", "split")),
        e.ExpectColumnValuesToBeUnique(column="image_id"),
        e.ExpectColumnValuesToMatchRegex(column="image_id", regex=r"^[0-9a-f]{64}$"),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        e.ExpectColumnValuesToBeBetween(column="n_captions", min_value=1),
        e.ExpectColumnValuesToBeBetween(column="min_caption_chars", min_value=cfg.min_caption_chars),
        e.ExpectColumnValuesToBeBetween(column="max_caption_chars", max_value=cfg.max_caption_chars),
    ]


def run_expectations(frame: pd.DataFrame, cfg: ValidateConfig) -> list[dict]:
    """Run the GX suite on the manifest; one dict per expectation with its failing row indices."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("clipcap")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="manifest"))
    for expectation in _expectations(cfg):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch_definition, suite=suite)
    )
    table = _caption_stats(frame).drop(columns=["captions"])
    result = definition.run(batch_parameters={"dataframe": table}, result_format="COMPLETE")
    out = []
    for item in result.results:
        config = item.expectation_config
        out.append(
            {
                "expectation": config.type,
                "column": config.kwargs.get("column"),
                "success": bool(item.success),
                "failing_rows": [int(i) for i in (item.result.get("unexpected_index_list") or [])],
            }
        )
    return out


def check_image(path: str | Path, min_side: int) -> list[str]:
    """Reasons the image at ``path`` is unusable (empty when it is fine)."""
    path = Path(path)
    if not path.is_file():
        return [f"image file not found: {path}"]
    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return [f"image does not decode ({type(err).__name__}: {err})"]
    if min(width, height) < min_side:
        return [f"image is {width}x{height}, smaller than validate.min_image_side={min_side}"]
    return []


def validate_manifest(frame: pd.DataFrame, cfg: ValidateConfig) -> ValidationReport:
    report = ValidationReport(rows=len(frame))
    report.expectations = run_expectations(frame, cfg)
    reasons: dict[int, list[str]] = {}
    for exp in report.expectations:
        for row in exp["failing_rows"]:
            reasons.setdefault(row, []).append(f"{exp['expectation']} failed on column {exp['column']}")
    for row, path in enumerate(frame["path"]):
        if problems := check_image(path, cfg.min_image_side):
            reasons.setdefault(row, []).extend(problems)
    for row in sorted(reasons):
        record = frame.iloc[row]
        report.failures.append(RowFailure(row, str(record["image_id"]), str(record["path"]), reasons[row]))
    log.info("validated %d rows: %d failing", len(frame), len(report.failures))
    return report

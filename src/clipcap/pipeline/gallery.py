"""The caption gallery: one self-contained HTML page per evaluation, worst captions first.

Each test image is shown as a thumbnail embedded in the page (a data URI, so the page renders the
same from disk and in MLflow's artifact view), beside its reference captions, the model's caption,
the retrieval baseline's, and the model's CIDEr on that image. A thumbnail that fails to decode in
the browser is flagged on the page. Above the table, the evaluation's charts (scores, learning curve),
embedded the same way.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from clipcap.fileio import write_text
from clipcap.images import load_rgb

THUMBNAIL = 160

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .4rem .6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.score { font-variant-numeric: tabular-nums; text-align: right; }
img { max-width: 160px; max-height: 160px; background: #fff; }
img.chart { max-width: 48%; max-height: none; margin: 0 1% 1rem 0; }
img[data-broken] { outline: 3px solid #c00; }
ul { margin: 0; padding-left: 1.1rem; }
"""


def thumbnail_uri(path: str | Path, size: int = THUMBNAIL) -> str:
    """A PNG data URI of the image shrunk to ``size`` pixels on its longer side (on white)."""
    image = load_rgb(path)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chart_tag(path: str | Path) -> str:
    """An ``<img>`` of the PNG at ``path``, embedded as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<img class="chart" src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}" '
            'onload="this.dataset.shown=this.naturalWidth+\'x\'+this.naturalHeight" onerror="this.dataset.broken=1">')


def write_gallery(path: str | Path, records: list[dict], title: str, charts: list[str | Path] = ()) -> None:
    """``records``: predictions.jsonl rows (path, references, prediction, retrieval, label where there is
    one, scores); ``charts``: PNGs shown above the table."""
    rows = sorted(records, key=lambda r: r["scores"].get("model", {}).get("CIDEr", 0.0))
    with_label = any("label" in r for r in rows)  # the label baseline, where the encoder has a classifier
    cells = []
    for r in rows:
        cider = r["scores"].get("model", {}).get("CIDEr")
        retrieval = r["scores"].get("baseline_retrieval", {}).get("CIDEr")
        label = r["scores"].get("baseline_label", {}).get("CIDEr")
        label_cells = (f"<td>{html.escape(r.get('label', ''))}</td>"
                       f'<td class="score">{"" if label is None else f"{label:.2f}"}</td>') if with_label else ""
        references = "".join(f"<li>{html.escape(c)}</li>" for c in r["references"])
        cells.append(
            "<tr>"
            f'<td><img src="{thumbnail_uri(r["path"])}" alt="{html.escape(Path(r["path"]).name)}" '
            'onload="this.dataset.shown=this.naturalWidth+\'x\'+this.naturalHeight" onerror="this.dataset.broken=1"></td>'
            f"<td><ul>{references}</ul></td>"
            f"<td>{html.escape(r['prediction'])}</td>"
            f'<td class="score">{"" if cider is None else f"{cider:.2f}"}</td>'
            f"<td>{html.escape(r['retrieval'])}</td>"
            f'<td class="score">{"" if retrieval is None else f"{retrieval:.2f}"}</td>'
            f"{label_cells}</tr>")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + "".join(chart_tag(chart) for chart in charts)
        + f"<p>{len(rows)} test images, the model's worst captions (by CIDEr on the image) first.</p>"
        "<table><thead><tr><th>image</th><th>references</th><th>model</th><th>CIDEr</th>"
        "<th>retrieval baseline</th><th>CIDEr</th>"
        + ("<th>label baseline</th><th>CIDEr</th>" if with_label else "") + "</tr></thead><tbody>"
        + "".join(cells) + "</tbody></table></body></html>\n")
    write_text(path, page)

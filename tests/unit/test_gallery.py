"""The caption gallery, opened in a real headless Chromium: every thumbnail and chart renders, worst first."""

from __future__ import annotations

import re

from PIL import Image

from browser import rendered_dom
from clipcap.pipeline.charts import score_table, write_score_chart
from clipcap.pipeline.gallery import write_gallery


def test_every_thumbnail_renders_in_chromium_worst_first(tmp_path):
    images = {"rgb.jpg": Image.new("RGB", (300, 200), (200, 30, 30)),
              "transparent.png": Image.new("RGBA", (64, 256), (0, 90, 200, 120)),
              "palette.gif": Image.new("P", (40, 40), 3),
              "gray16.png": Image.new("I;16", (50, 50), 40000)}
    records = []
    for index, (name, image) in enumerate(images.items()):
        image.save(tmp_path / name)
        records.append({"path": str(tmp_path / name), "references": [f"A {name} <b>picture</b>."],
                        "prediction": f"caption {index} <script>alert(1)</script>", "retrieval": "A thing.",
                        "scores": {"model": {"CIDEr": [0.9, 0.1, 2.5, 0.4][index]},
                                   "baseline_retrieval": {"CIDEr": 0.5}}})
    page = tmp_path / "gallery.html"
    chart = tmp_path / "scores.png"
    write_score_chart(score_table({"model": {"CIDEr": 1.0}, "baseline_retrieval": {"CIDEr": 0.5}}), chart, "scores")
    write_gallery(page, records, "clipcap-test: captions", charts=[chart])

    dom = rendered_dom(page, tmp_path / "profile")
    charts = re.findall(r'<img class="chart"[^>]*>', dom)
    assert len(charts) == 1 and 'data-shown="800x400"' in charts[0], charts   # decoded at its full size
    thumbnails = [img for img in re.findall(r"<img [^>]*>", dom) if 'class="chart"' not in img]
    assert len(thumbnails) == 4 and not any("data-broken" in img for img in thumbnails)
    shown = {re.search(r'alt="([^"]+)"', img)[1]: re.search(r'data-shown="([^"]*)"', img)[1] for img in thumbnails}
    # decoded by the browser at thumbnail size: the longer side shrunk to 160 px, small images kept
    assert shown == {"rgb.jpg": "160x107", "transparent.png": "40x160", "palette.gif": "40x40",
                     "gray16.png": "50x50"}, shown
    assert "<script>alert(1)</script>" not in dom and "&lt;script&gt;" in dom   # captions are escaped
    scores = [float(s) for s in re.findall(r'<td class="score">([0-9.]+)</td>', dom)[::2]]
    assert scores == sorted(scores) == [0.1, 0.4, 0.9, 2.5]                       # worst first
    assert "src=\"data:image/png;base64," in dom and "file://" not in dom.split("<body")[1]  # self-contained

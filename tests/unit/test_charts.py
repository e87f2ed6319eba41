"""The evaluate stage's pictures: the score table they are drawn from, valid PNGs, and the gallery
embedding them."""

from __future__ import annotations

import base64

from PIL import Image

from clipcap.pipeline.charts import score_table, write_curve_chart, write_score_chart
from clipcap.pipeline.reports import read_curve, series
from clipcap.pipeline.gallery import write_gallery

METRICS = {
    "model": {"CIDEr": 1.7, "BLEU-4": 0.3, "METEOR": 0.2, "names_object": 0.36},
    "baseline_retrieval": {"CIDEr": 1.4, "BLEU-4": 0.25, "METEOR": 0.18, "names_object": 0.33},
    "baseline_most_frequent": {"CIDEr": 0.01, "BLEU-4": 0.0, "METEOR": 0.02, "names_object": 0.0},
    "test_images": 76,
    "ci95": {"model": {"CIDEr": [1.2, 2.1]}, "baseline_retrieval": {"CIDEr": [1.0, 1.8], "METEOR": [0.1, 0.2]},
             "baseline_most_frequent": {"METEOR": [0.025, 0.04]}},   # a bootstrap interval above the corpus score
}


def test_the_score_table_holds_each_system_with_its_interval():
    table = score_table(METRICS)
    assert list(table) == ["model", "retrieval", "most frequent"]      # no label system: none in the metrics
    assert table["model"]["CIDEr"] == (1.7, 1.2, 2.1)
    assert table["retrieval"]["METEOR"] == (0.18, 0.1, 0.2)
    assert table["model"]["names_object"] == (0.36, 0.36, 0.36)         # no interval: the score at both ends
    assert "test_images" not in table


def test_charts_are_pngs_of_the_set_size(tmp_path):
    write_score_chart(score_table(METRICS), tmp_path / "scores.png", "scores")
    (tmp_path / "curve.csv").write_text("epoch,step,train_loss,val_loss,val_CIDEr\n1,2,3.0,2.5,0.4\n"
                                        "2,4,2.0,2.1,\n3,6,1.5,2.0,0.9\n")   # epoch 2: no CIDEr computed
    curve = read_curve(tmp_path / "curve.csv")
    assert series(curve, "val_CIDEr") == [(1.0, 0.4), (3.0, 0.9)]           # each value at its own epoch
    assert series(curve, "val_loss", x="step") == [(2.0, 2.5), (4.0, 2.1), (6.0, 2.0)]
    write_curve_chart(curve, tmp_path / "curve.png", "curve")
    write_curve_chart(read_curve(tmp_path / "missing.csv"), tmp_path / "empty.png", "no training logged")
    for name in ("scores.png", "curve.png", "empty.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size == (800, 400), name
    assert (tmp_path / "scores.png").read_bytes() != (tmp_path / "curve.png").read_bytes()


def test_the_gallery_embeds_its_charts(tmp_path):
    chart = tmp_path / "scores.png"
    write_score_chart(score_table(METRICS), chart, "scores")
    write_gallery(tmp_path / "gallery.html", [], "t", charts=[chart])
    page = (tmp_path / "gallery.html").read_text()
    assert f'<img class="chart" src="data:image/png;base64,{base64.b64encode(chart.read_bytes()).decode()}"' in page

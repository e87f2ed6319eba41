"""The documentation site: `bash scripts/docs.sh` builds it offline with mkdocs --strict, and the built
home page, opened in headless Chromium, shows the caption gallery's screenshot and the charts."""

from __future__ import annotations

import re
import subprocess

import pytest

from browser import rendered_dom
from projects import ROOT

pytestmark = pytest.mark.pipeline


def test_the_site_builds_strictly_and_its_home_page_shows_the_gallery_and_the_charts(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), str(site)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for page in ("index.html", "guide/serving.html", "reference/params.html", "reference/cli.html",
                 "experiments/reference-runs.html", "results/index.html"):
        assert (site / page).is_file(), page
    params = (site / "reference" / "params.html").read_text()
    assert "retrieval.k" in params and "serve.max_images" in params          # generated from params.yaml
    assert "clipcap add-batch" in (site / "reference" / "cli.html").read_text()   # and from the CLI

    dom = rendered_dom(site / "index.html", tmp_path / "profile")
    images = {re.search(r'src="([^"]+)"', img)[1]: img for img in re.findall(r"<img [^>]*>", dom)}
    for name in ("images/gallery.png", "images/scores.png", "images/learning_curve.png"):
        assert name in images, sorted(images)
        assert "data-broken" not in images[name] and re.search(r'data-shown="\d+x\d+"', images[name]), images[name]

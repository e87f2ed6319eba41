"""The documentation site: `bash scripts/docs.sh` builds it offline with mkdocs --strict, and the built
home page, opened in headless Chromium, shows the caption gallery's screenshot and the charts."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from projects import ROOT

pytestmark = pytest.mark.pipeline

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000", "--dump-dom"]


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

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test: scripts/test.sh installs Debian's chromium"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          (site / "index.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = {re.search(r'src="([^"]+)"', img)[1]: img for img in re.findall(r"<img [^>]*>", dom)}
    for name in ("images/gallery.png", "images/scores.png", "images/learning_curve.png"):
        assert name in images, sorted(images)
        assert "data-broken" not in images[name] and re.search(r'data-shown="\d+x\d+"', images[name]), images[name]

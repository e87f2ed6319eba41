"""A page opened in a real headless Chromium (Debian's; scripts/test.sh installs it): its DOM after the
page's scripts and image loads ran."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000", "--dump-dom"]


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` (a file) as Chromium leaves it; ``profile``: a fresh folder for its user data."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test: scripts/test.sh installs Debian's chromium"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", page.as_uri()],
                          capture_output=True, text=True, timeout=120).stdout

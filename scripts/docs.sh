#!/usr/bin/env bash
# Build the documentation site offline: the generated pages (scripts/docs_pages.py), then mkdocs --strict
# (a broken link, or a nav entry without its page, fails the build).
#
#   bash scripts/docs.sh [SITE_DIR]      # default: site/ ; open SITE_DIR/index.html
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
export NO_MKDOCS_2_WARNING=1   # the banner about the next major version
python scripts/docs_pages.py
mkdocs build --strict --site-dir "$(realpath -m "${1:-site}")"
echo "site: $(realpath -m "${1:-site}")/index.html"

#!/usr/bin/env bash
# Set-up plus the whole test suite (unit, data and pipeline tests). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# the caption-gallery test opens the page in a real headless browser (Debian's Chromium)
if ! command -v chromium >/dev/null; then
  echo "clipcap: installing Debian's chromium for the gallery test..."
  _clipcap_need_root apt-get update -q >/dev/null
  _clipcap_need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
python -m pytest "$@"

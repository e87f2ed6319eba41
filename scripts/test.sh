#!/usr/bin/env bash
# Set-up plus the whole test suite (unit, data and pipeline tests). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pytest "$@"

#!/usr/bin/env bash
# The whole pipeline on the embedded offline default: set-up, `dvc repro`, where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

[ -d data ] || dvc checkout -q data.dvc 2>/dev/null || mkdir -p data
start=$(date +%s)
dvc repro "$@"
echo "dvc repro took $(( $(date +%s) - start )) s"

echo
echo "== metrics (artifacts/metrics.json) =="
dvc metrics show
echo
echo "== sample captions: artifacts/evaluation/samples.md =="
head -n 12 artifacts/evaluation/samples.md
echo
echo "== registered model (artifacts/registered.json) =="
cat artifacts/registered.json
echo
echo "Caption your own images:  source scripts/env.sh && clipcap caption IMAGE... --model models:/clipcap-tuxpaint@champion"
echo "Browse runs:              source scripts/env.sh && mlflow ui --backend-store-uri sqlite:///mlflow.db"

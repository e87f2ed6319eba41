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
clipcap summary
echo
echo "Metrics: dvc metrics show | Loss curve: dvc plots show | Samples: artifacts/evaluation/samples.md"
echo "Caption your own images:  source scripts/env.sh && clipcap caption IMAGE... --model models:/clipcap-tuxpaint@champion"
echo "Browse runs:              source scripts/env.sh && mlflow ui --backend-store-uri sqlite:///mlflow.db"

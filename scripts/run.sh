#!/usr/bin/env bash
# The whole pipeline on the embedded offline default (tuxpaint): set-up, `dvc repro`, where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

[ -d data ] || dvc checkout -q data.dvc 2>/dev/null || mkdir -p data
# each dataset's batches folder data/<dataset>/ (fetch's DVC dependency) with a README recorded in data.dvc: DVC
# removes an empty folder when it checks data.dvc out (`dvc exp run` does), and every stage would then fail
python - $(clipcap datasets) <<'PY'
import sys
from pathlib import Path
from clipcap.pipeline.dvc_project import keep_batches_folders
for path in keep_batches_folders(Path("."), sys.argv[1:]):
    print(f"wrote {path}, recorded in data.dvc")
PY
# No arguments: the embedded default, the first dataset in params.yaml (tuxpaint). Arguments go to
# `dvc repro`: `bash scripts/run.sh --all` or plain `dvc repro` builds every dataset, `register@openclipart` one.
default=$(clipcap datasets | sed -n 1p)
if [ $# -eq 0 ]; then set -- "register@$default"; elif [ "$1" = "--all" ]; then shift; fi
start=$(date +%s)
dvc repro "$@"
echo "dvc repro took $(( $(date +%s) - start )) s"
# what clipcap models restore pulls: each built dataset's artifacts, to the default DVC remote
for dataset in $(clipcap datasets); do
  if [ -f "artifacts/$dataset/registered.json" ]; then
    dvc push -q --with-deps "evaluate@$dataset"
    echo "pushed artifacts/$dataset/ to the DVC remote '$(dvc remote default)'"
  fi
done

echo
for dataset in $(clipcap datasets); do
  [ -f "artifacts/$dataset/registered.json" ] || continue
  echo "== $dataset =="; clipcap --dataset "$dataset" summary; echo
done
echo
echo "Metrics: dvc metrics show | Curves: dvc plots show | Samples: artifacts/<dataset>/evaluation/samples.md"
echo "Caption your own images:  source scripts/env.sh && clipcap caption IMAGE... --model models:/clipcap-tuxpaint@champion"
echo "Browse runs:              source scripts/env.sh && mlflow ui --backend-store-uri sqlite:///mlflow.db"

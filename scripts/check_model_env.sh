#!/usr/bin/env bash
# Does a registered model stand on its own? Builds a fresh venv from the model's own requirements.txt
# (nothing of this project installed or on PYTHONPATH), then loads the model with an empty
# CLIPCAP_CACHE and captions a photo (skimage's cat), as a server on another machine would; an
# entity-aware model names its entity source and the entities it reads in the photo.
#   bash scripts/check_model_env.sh models:/clipcap-tuxpaint@champion [TRACKING_URI]
# TRACKING_URI defaults to this project's sqlite:///mlflow.db. Needs PyPI (the venv is built from it);
# the work folder (~7 GB with torch) is removed at the end unless KEEP=1.
set -euo pipefail
uri=${1:?usage: check_model_env.sh MODEL_URI [TRACKING_URI]}
root=$(cd "$(dirname "$0")/.." && pwd)
export MLFLOW_TRACKING_URI=${2:-${MLFLOW_TRACKING_URI:-sqlite:///$root/mlflow.db}}
work=$(mktemp -d "${TMPDIR:-/tmp}/clipcap-model-env-XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

# shellcheck disable=SC1091
source "$root/scripts/env.sh" >/dev/null   # this project's venv only to download the model
mlflow artifacts download -u "$uri" -d "$work/model" >/dev/null
python -c "import sys; from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save(sys.argv[1])" \
    "$work/photo.png"
deactivate
echo "model: $uri -> $work/model"
echo "its requirements:"; sed 's/^/  /' "$work/model/requirements.txt"

python3 -m venv "$work/venv"
start=$(date +%s)
"$work/venv/bin/pip" install -q -r "$work/model/requirements.txt"
echo "fresh venv from the model's requirements: $(( $(date +%s) - start )) s"

mkdir "$work/empty-cache"
env -i PATH=/usr/bin:/bin HOME="$HOME" CLIPCAP_CACHE="$work/empty-cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$work/venv/bin/python" - "$work/model" "$work/photo.png" <<'EOF'
import base64, json, sys, time
from pathlib import Path
import pandas as pd
import mlflow.pyfunc

start = time.time()
model = mlflow.pyfunc.load_model(sys.argv[1])
print(f"loaded in {time.time() - start:.1f} s with an empty CLIPCAP_CACHE")
import clipcap
print("clipcap code from:", clipcap.__file__)
photo = Path(sys.argv[2]).read_bytes()
print("caption of skimage's cat:", model.predict(pd.DataFrame({"image": [base64.b64encode(photo).decode()]})))
captioner = model.unwrap_python_model().captioner
if captioner.entity_head is not None:
    settings = captioner.entity_head.settings
    print(f"entities: {settings.source}, {len(settings.vocabulary)} nouns; in the photo:",
          captioner.entities(captioner.embed([sys.argv[2]]))[0])
EOF
echo "cache after loading: $(find "$work/empty-cache" -type f | wc -l) files"

#!/usr/bin/env bash
# Does a registered model stand on its own? Builds a fresh venv from the model's own requirements.txt
# (nothing of this project installed or on PYTHONPATH), then loads the model with an empty
# CLIPCAP_CACHE and captions a generated image, as a server on another machine would.
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
deactivate
echo "model: $uri -> $work/model"
echo "its requirements:"; sed 's/^/  /' "$work/model/requirements.txt"

python3 -m venv "$work/venv"
start=$(date +%s)
"$work/venv/bin/pip" install -q -r "$work/model/requirements.txt"
echo "fresh venv from the model's requirements: $(( $(date +%s) - start )) s"

mkdir "$work/empty-cache"
env -i PATH=/usr/bin:/bin HOME="$HOME" CLIPCAP_CACHE="$work/empty-cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$work/venv/bin/python" - "$work/model" <<'EOF'
import base64, io, sys, time
import numpy as np
import pandas as pd
from PIL import Image
import mlflow.pyfunc

start = time.time()
model = mlflow.pyfunc.load_model(sys.argv[1])
print(f"loaded in {time.time() - start:.1f} s with an empty CLIPCAP_CACHE")
import clipcap
print("clipcap code from:", clipcap.__file__)
image = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(image, "PNG")
print("caption:", model.predict(pd.DataFrame({"image": [base64.b64encode(image.getvalue()).decode()]})))
EOF
echo "cache after loading: $(find "$work/empty-cache" -type f | wc -l) files"

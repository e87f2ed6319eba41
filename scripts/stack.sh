#!/usr/bin/env bash
# The team stack on this machine: a Prefect server, an MLflow tracking server (sqlite database +
# artifact store, artifacts served over HTTP) and a worker serving one retraining deployment per dataset
# (flows/serve.py), all on 127.0.0.1.
#
#   bash scripts/stack.sh start [--project DIR] [--interval SECONDS]   # start all three, wait until healthy
#   eval "$(bash scripts/stack.sh env)"                                 # point this shell (clipcap, dvc, prefect) at them
#   bash scripts/stack.sh status | stop
#
# Settings (environment): CLIPCAP_STACK_DIR (state, logs, databases; default <project>/.stack),
# CLIPCAP_PREFECT_PORT (4200), CLIPCAP_MLFLOW_PORT (5000). With the stack's variables set, the project
# uses it: PREFECT_API_URL for schedules and events, MLFLOW_TRACKING_URI for runs and the registry
# (params.yaml's register.tracking_uri: null). The README says how each piece scales out.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
action=${1:-}; shift || true
PROJECT=$ROOT
INTERVAL=()
while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT=$(cd "$2" && pwd); shift 2 ;;
    --interval) INTERVAL=(--interval "$2"); shift 2 ;;
    *) echo "stack.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
STACK=${CLIPCAP_STACK_DIR:-$PROJECT/.stack}
PREFECT_PORT=${CLIPCAP_PREFECT_PORT:-4200}
MLFLOW_PORT=${CLIPCAP_MLFLOW_PORT:-5000}

stack_env() {
  echo "export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api"
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
}

running() { [ -f "$STACK/$1.pid" ] && kill -0 "$(cat "$STACK/$1.pid")" 2>/dev/null; }

wait_for() {  # name url seconds
  local name=$1 url=$2 deadline=$(( $(date +%s) + $3 ))
  until python - "$url" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2)
EOF
  do
    if ! running "$name"; then echo "stack.sh: $name exited; see $STACK/$name.log:" >&2; tail -20 "$STACK/$name.log" >&2; exit 1; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "stack.sh: $name not healthy at $url after $3 s; see $STACK/$name.log" >&2; exit 1; fi
    sleep 1
  done
}

launch() {  # name command...: in the background, in its own process group, logging to $STACK/name.log
  local name=$1; shift
  if running "$name"; then echo "$name already running (pid $(cat "$STACK/$name.pid"))"; return; fi
  setsid "$@" >"$STACK/$name.log" 2>&1 < /dev/null &
  echo $! >"$STACK/$name.pid"
}

case "$action" in
  env) stack_env ;;
  start)
    # shellcheck disable=SC1091
    source "$ROOT/scripts/env.sh"
    mkdir -p "$STACK/prefect" "$STACK/mlartifacts"
    export PREFECT_HOME=$STACK/prefect
    eval "$(stack_env)"
    launch prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    launch mlflow-server mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "sqlite:///$STACK/mlflow.db" --artifacts-destination "$STACK/mlartifacts"
    wait_for prefect-server "http://127.0.0.1:$PREFECT_PORT/api/health" 180
    wait_for mlflow-server "http://127.0.0.1:$MLFLOW_PORT/health" 180
    (cd "$PROJECT" && launch worker python "$ROOT/flows/serve.py" --project "$PROJECT" "${INTERVAL[@]}")
    deadline=$(( $(date +%s) + 180 ))
    until grep -q "being served" "$STACK/worker.log" 2>/dev/null; do  # its deployments exist on the server
      if ! running worker; then echo "stack.sh: the worker exited; see $STACK/worker.log:" >&2; tail -20 "$STACK/worker.log" >&2; exit 1; fi
      if [ "$(date +%s)" -ge "$deadline" ]; then echo "stack.sh: the worker is not serving after 180 s; see $STACK/worker.log" >&2; exit 1; fi
      sleep 1
    done
    echo "Prefect: http://127.0.0.1:$PREFECT_PORT   MLflow: http://127.0.0.1:$MLFLOW_PORT   logs: $STACK/*.log"
    echo "Point a shell at them:  eval \"\$(bash scripts/stack.sh env)\"" ;;
  status)
    for name in prefect-server mlflow-server worker; do
      if running "$name"; then echo "$name: running (pid $(cat "$STACK/$name.pid"))"; else echo "$name: stopped"; fi
    done ;;
  stop)
    for name in worker mlflow-server prefect-server; do  # the worker first: it pauses its schedules on the way out
      if running "$name"; then
        pid=$(cat "$STACK/$name.pid")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "$name: stopped"
      fi
      rm -f "$STACK/$name.pid"
    done ;;
  *) echo "usage: bash scripts/stack.sh start|stop|status|env [--project DIR] [--interval SECONDS]" >&2; exit 2 ;;
esac

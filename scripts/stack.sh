#!/usr/bin/env bash
# The team stack on this machine: a PostgreSQL server of its own, a Prefect server and an MLflow tracking
# server (runs and registry) on it, an artifact store served over HTTP, a Dask scheduler with its workers
# (the retraining runs encode new images and caption the test split in parts on them), one retraining
# deployment per dataset on a Prefect work pool (flows/serve.py --work-pool) and the pool's workers, each
# taking one run at a time: all on 127.0.0.1, each a process of its own as on separate machines.
#
#   bash scripts/stack.sh start [--project DIR] [--interval SECONDS] [--db postgres|sqlite]
#   eval "$(bash scripts/stack.sh env)"          # point this shell (clipcap, dvc, prefect) at it
#   bash scripts/stack.sh status | stop          # stop: everything, cleanly; a second start reuses the data
#   bash scripts/stack.sh psql -- -d mlflow      # a psql client on one of its databases (prefect, mlflow)
#   bash scripts/stack.sh destroy                # stop, then delete its state: databases, artifacts, logs
#
# --db sqlite keeps the single-user stores (a SQLite file per server; what scripts/run.sh uses) for
# comparison. PostgreSQL runs from Debian's server programs (CLIPCAP_PG_BIN, default the newest
# /usr/lib/postgresql/*/bin) as the `postgres` system user when this script runs as root (the server
# refuses root), with its data in the stack's folder, listening on 127.0.0.1 only, password-protected (a
# random password made at the first start, kept in that folder).
#
# Settings (environment): CLIPCAP_STACK_DIR (state, logs, databases; default <project>/.stack),
# CLIPCAP_PREFECT_PORT (4200), CLIPCAP_MLFLOW_PORT (5000), CLIPCAP_PG_PORT (5433), CLIPCAP_DASK_PORT
# (8786), CLIPCAP_DASK_WORKERS (2: Dask workers, one thread each, and the parts each run encodes and captions
# in), CLIPCAP_PREFECT_WORKERS (2: Prefect workers, so runs of 2 datasets at once), CLIPCAP_WORK_POOL
# (clipcap). With the stack's variables set, the project uses it: PREFECT_API_URL for schedules and events,
# MLFLOW_TRACKING_URI for runs and the registry (params.yaml's register.tracking_uri: null),
# CLIPCAP_DASK_ADDRESS for work in parts. The flows run are the project's own flows/ when it has one, else
# this clone's. The README says how each piece scales out.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
action=${1:-}; shift || true
PROJECT=$ROOT
INTERVAL=()
DB=postgres
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; EXTRA=("$@"); break ;;
    --project) PROJECT=$(cd "$2" && pwd); shift 2 ;;
    --interval) INTERVAL=(--interval "$2"); shift 2 ;;
    --db) DB=$2; shift 2
          case "$DB" in postgres|sqlite) ;; *) echo "stack.sh: --db postgres or sqlite, not $DB" >&2; exit 2 ;; esac ;;
    *) echo "stack.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
STACK=${CLIPCAP_STACK_DIR:-$PROJECT/.stack}
FLOWS=$ROOT/flows
if [ -f "$PROJECT/flows/serve.py" ]; then FLOWS=$PROJECT/flows; fi
PREFECT_PORT=${CLIPCAP_PREFECT_PORT:-4200}
MLFLOW_PORT=${CLIPCAP_MLFLOW_PORT:-5000}
PG_PORT=${CLIPCAP_PG_PORT:-5433}
DASK_PORT=${CLIPCAP_DASK_PORT:-8786}
DASK_WORKERS=${CLIPCAP_DASK_WORKERS:-2}
PREFECT_WORKERS=${CLIPCAP_PREFECT_WORKERS:-2}
WORK_POOL=${CLIPCAP_WORK_POOL:-clipcap}
PG_BIN=${CLIPCAP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
# PostgreSQL's folder (its data/, log and password), owned by the server's user: in the stack's folder, or,
# when that is private to root (the server runs as `postgres`), in /var/tmp under a name of the stack's path
pg_dir() {
  if [ -n "${CLIPCAP_PG_DIR:-}" ]; then echo "$CLIPCAP_PG_DIR"
  elif [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$STACK" 2>/dev/null; then
    echo "/var/tmp/clipcap-postgres-$(echo -n "$STACK" | sha256sum | cut -c1-12)"
  else echo "$STACK/postgres"; fi
}

stack_env() {
  echo "export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api"
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  echo "export CLIPCAP_DASK_ADDRESS=tcp://127.0.0.1:$DASK_PORT"
}

dask_workers() { seq -f "dask-worker-%g" 1 "$DASK_WORKERS"; }
prefect_workers() { seq -f "prefect-worker-%g" 1 "$PREFECT_WORKERS"; }

running() { [ -f "$STACK/$1.pid" ] && kill -0 "$(cat "$STACK/$1.pid")" 2>/dev/null; }

as_pg() {  # a PostgreSQL program, as the postgres system user when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_url() {  # driver database: the SQLAlchemy URL of one of the stack's databases
  echo "postgresql+$1://clipcap:$(cat "$PG_DIR/password")@127.0.0.1:$PG_PORT/$2"
}

pg_running() { [ -f "$PG_DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; }

pg_start() {  # initialise (first start only), start, and create the prefect and mlflow databases
  if [ ! -x "$PG_BIN/initdb" ]; then
    echo "stack.sh: no PostgreSQL server programs (initdb) in '$PG_BIN'; install Debian's postgresql package," \
         "set CLIPCAP_PG_BIN to their folder, or use --db sqlite" >&2; exit 1
  fi
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    mkdir -p "$PG_DIR"
    [ "$PG_DIR" = "$STACK/postgres" ] || echo "stack.sh: PostgreSQL's data in $PG_DIR (the postgres user cannot reach $STACK)"
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > "$PG_DIR/password")
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$PG_DIR"; fi
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U clipcap -E UTF8 --auth-local=trust --auth-host=scram-sha-256 \
      --pwfile="$PG_DIR/password" >"$STACK/postgres-init.log" 2>&1 \
      || { echo "stack.sh: initdb failed; see $STACK/postgres-init.log:" >&2; tail -5 "$STACK/postgres-init.log" >&2; exit 1; }
  fi
  if ! pg_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 120 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null \
      || { echo "stack.sh: PostgreSQL did not start; see $PG_DIR/server.log:" >&2; tail -5 "$PG_DIR/server.log" >&2; exit 1; }
  fi
  local db
  for db in prefect mlflow; do
    if ! PGPASSWORD=$(cat "$PG_DIR/password") psql -h 127.0.0.1 -p "$PG_PORT" -U clipcap -d postgres -tAc \
        "select 1 from pg_database where datname = '$db'" | grep -q 1; then
      PGPASSWORD=$(cat "$PG_DIR/password") "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U clipcap "$db"
    fi
  done
}

http_ok() {  # url: whether it answers
  python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

wait_until() {  # name seconds command...: until the command succeeds; fails when the process name exits first
  local name=$1 seconds=$2 deadline=$(( $(date +%s) + $2 )); shift 2
  until "$@"; do
    if ! running "$name"; then echo "stack.sh: $name exited; see $STACK/$name.log:" >&2; tail -20 "$STACK/$name.log" >&2; exit 1; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "stack.sh: $name not ready after $seconds s ($*); see $STACK/$name.log" >&2; exit 1
    fi
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
    PG_DIR=$(pg_dir)
    export PREFECT_HOME=$STACK/prefect
    eval "$(stack_env)"
    if [ "$DB" = postgres ]; then
      pg_start
      mlflow_store=$(pg_url psycopg mlflow)
      prefect_store=$(pg_url asyncpg prefect)
    else
      mlflow_store=sqlite:///$STACK/mlflow.db
      prefect_store=sqlite+aiosqlite:///$STACK/prefect/prefect.db
    fi
    # each request answered 503 (the database busy: the client retries it) is logged
    PREFECT_API_DATABASE_CONNECTION_URL=$prefect_store PREFECT_API_LOG_RETRYABLE_ERRORS=true \
      launch prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    launch mlflow-server mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "$mlflow_store" --artifacts-destination "$STACK/mlartifacts"
    launch dask-scheduler dask scheduler --host 127.0.0.1 --port "$DASK_PORT" --no-dashboard
    for name in $(dask_workers); do   # the flows folder on the path: Prefect's tasks travel by module name
      (cd "$PROJECT" && PYTHONPATH="$FLOWS:$PYTHONPATH" launch "$name" dask worker "$CLIPCAP_DASK_ADDRESS" \
         --name "$name" --nthreads 1 --no-dashboard)
    done
    wait_until prefect-server 180 http_ok "http://127.0.0.1:$PREFECT_PORT/api/health"
    wait_until mlflow-server 180 http_ok "http://127.0.0.1:$MLFLOW_PORT/health"
    if ! python - "$CLIPCAP_DASK_ADDRESS" "$DASK_WORKERS" <<'EOF'
import sys
from distributed import Client
with Client(sys.argv[1], timeout=120) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=120)
EOF
    then echo "stack.sh: the Dask cluster did not come up; see $STACK/dask-*.log" >&2; exit 1; fi
    (cd "$PROJECT" && python "$FLOWS/serve.py" --project "$PROJECT" "${INTERVAL[@]}" --work-pool "$WORK_POOL" \
       --parts "$DASK_WORKERS" --dask "$CLIPCAP_DASK_ADDRESS" >"$STACK/deploy.log" 2>&1) \
      || { echo "stack.sh: the deployments were not created; see $STACK/deploy.log:" >&2; tail -20 "$STACK/deploy.log" >&2; exit 1; }
    for name in $(prefect_workers); do   # each takes one run at a time: runs of different datasets overlap
      (cd "$PROJECT" && launch "$name" prefect worker start --pool "$WORK_POOL" --type process --limit 1 --name "$name")
    done
    for name in $(prefect_workers); do wait_until "$name" 180 grep -q started "$STACK/$name.log"; done
    echo "Prefect: http://127.0.0.1:$PREFECT_PORT (work pool $WORK_POOL, $PREFECT_WORKERS workers)   MLflow: http://127.0.0.1:$MLFLOW_PORT   Dask: $CLIPCAP_DASK_ADDRESS ($DASK_WORKERS workers)   stores: $DB   logs: $STACK/*.log"
    echo "Point a shell at them:  eval \"\$(bash scripts/stack.sh env)\"" ;;
  status)
    PG_DIR=$(pg_dir)
    if [ -x "$PG_BIN/pg_ctl" ] && [ -d "$PG_DIR/data" ]; then
      if pg_running; then echo "postgres: running (pid $(head -1 "$PG_DIR/data/postmaster.pid"), 127.0.0.1:$PG_PORT)"
      else echo "postgres: stopped"; fi
    fi
    for name in prefect-server mlflow-server dask-scheduler $(dask_workers) $(prefect_workers); do
      if running "$name"; then echo "$name: running (pid $(cat "$STACK/$name.pid"))"; else echo "$name: stopped"; fi
    done ;;
  stop|destroy)
    PG_DIR=$(pg_dir)
    # the Prefect workers first: no new run starts while the rest goes down
    for name in $(prefect_workers) $(dask_workers) dask-scheduler mlflow-server prefect-server; do
      if running "$name"; then
        pid=$(cat "$STACK/$name.pid")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "$name: stopped"
      fi
      rm -f "$STACK/$name.pid"
    done
    if pg_running; then   # last: the servers above used it; stopped once its server process has exited
      pid=$(head -1 "$PG_DIR/data/postmaster.pid")
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      echo "postgres: stopped"
    fi
    if [ "$action" = destroy ]; then rm -rf "$PG_DIR" "$STACK" && echo "deleted $STACK${PG_DIR:+ and $PG_DIR}"; fi ;;
  psql)
    PG_DIR=$(pg_dir)
    if [ ! -f "$PG_DIR/password" ]; then echo "stack.sh: no PostgreSQL in $PG_DIR: start the stack first" >&2; exit 1; fi
    PGPASSWORD=$(cat "$PG_DIR/password") exec psql -h 127.0.0.1 -p "$PG_PORT" -U clipcap "${EXTRA[@]}" ;;
  *) echo "usage: bash scripts/stack.sh start|stop|status|env|psql|destroy [--project DIR] [--interval SECONDS] [--db postgres|sqlite] [-- psql options]" >&2; exit 2 ;;
esac

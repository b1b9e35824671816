#!/usr/bin/env bash
# Embedded services on loopback: `scripts/dev.sh start|stop|status|ray-up`.
#   Ray head (GCS 6379, dashboard 8265) with Serve HTTP on 8000, MLflow UI 5000,
#   Dagster webserver 3000 and daemon (sensors). PIDs in $OCM_HOME/run, logs in $OCM_HOME/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv
export OCM_HOME=${OCM_HOME:-$ROOT/.ocm}
export DAGSTER_HOME=${DAGSTER_HOME:-$OCM_HOME/dagster}
export RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-1}
RUN=$OCM_HOME/run
LOGS=$OCM_HOME/logs
RAY_TMP=$OCM_HOME/ray
mkdir -p "$RUN" "$LOGS" "$DAGSTER_HOME" "$OCM_HOME/mlflow/artifacts"
"$VENV/bin/python" -c "from ocm_resources.env import ensure_dagster_home; ensure_dagster_home()"

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

wait_http() {  # url seconds
  for _ in $(seq 1 "$2"); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 1
  done
  echo "!! $1 did not answer within $2 s (logs in $LOGS)" >&2
  return 1
}

start_bg() {  # name cmd...
  local name=$1; shift
  if alive "$name"; then echo "   $name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  nohup "$@" > "$LOGS/$name.log" 2>&1 &
  echo $! > "$RUN/$name.pid"
  echo "   $name started (pid $!), log $LOGS/$name.log"
}

ray_up() {
  if "$VENV/bin/python" - <<EOF 2>/dev/null
import socket, sys
s = socket.socket(); s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", 6379)) == 0 else 1)
EOF
  then
    echo "   ray head already running on 127.0.0.1:6379"
  else
    # Serve's throughput-optimized direct ingress must be in the head's environment before it starts.
    # RAY_ADDRESS in the head's environment pins Ray's own helper processes (e.g. Train's placement-group
    # cleaner) to this cluster when other Ray instances run on the machine.
    # Idle worker processes are kept a minute (Ray: 1 s), so each training epoch's data read starts warm
    # (ocm_resources/ray.py, IDLE_WORKER_KEEP_MS).
    RAY_ADDRESS=127.0.0.1:6379 RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1} \
    RAY_idle_worker_killing_time_threshold_ms=${RAY_idle_worker_killing_time_threshold_ms:-60000} \
    "$VENV/bin/ray" start --head --node-ip-address=127.0.0.1 --port=6379 \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --include-dashboard=true \
      --num-cpus="${OCM_RAY_CPUS:-4}" --object-store-memory=$((1024 * 1024 * 1024)) \
      --temp-dir="$RAY_TMP" --disable-usage-stats > "$LOGS/ray-head.log" 2>&1
    echo "   ray head started (127.0.0.1:6379, dashboard http://127.0.0.1:8265), log $LOGS/ray-head.log"
  fi
  RAY_ADDRESS=127.0.0.1:6379 "$VENV/bin/python" -m ocm_resources.serve_control start-http \
    --host 127.0.0.1 --port 8000 >> "$LOGS/ray-head.log" 2>&1 || {
      echo "!! Serve HTTP did not start on 127.0.0.1:8000 (see $LOGS/ray-head.log)" >&2; return 1; }
  echo "   Serve HTTP on http://127.0.0.1:8000"
}

ray_down() {
  # Only the processes of this head: their command lines name our temp dir.
  # The raylet's agents rename themselves (ray::DashboardAgent, ray::RuntimeEnvAgent) and lose the temp dir
  # from their command line: take the children of the matched processes too, or they outlive the head.
  local pids kids
  pids=$(pgrep -f -- "$RAY_TMP" || true)
  if [ -n "$pids" ]; then
    kids=$(for p in $pids; do pgrep -P "$p" || true; done)
    kill $pids $kids 2>/dev/null || true
    sleep 2
    pids=$(pgrep -f -- "$RAY_TMP" || true)
    # gcs_server and raylet ignore SIGTERM
    for p in $pids $kids; do kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null; done
    echo "   ray head stopped"
  fi
}

start() {
  echo ">> starting the embedded stack (OCM_HOME=$OCM_HOME)"
  ray_up
  start_bg mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port 5000 \
    --backend-store-uri "sqlite:///$OCM_HOME/mlflow/mlflow.db" \
    --default-artifact-root "$OCM_HOME/mlflow/artifacts"
  start_bg dagster-daemon "$VENV/bin/dagster-daemon" run -w "$ROOT/workspace.yaml"
  start_bg dagster-webserver "$VENV/bin/dagster-webserver" -w "$ROOT/workspace.yaml" -h 127.0.0.1 -p 3000
  wait_http http://127.0.0.1:5000/health 60 || true
  wait_http http://127.0.0.1:3000/server_info 90 || true
  cat <<EOF

   Dagster UI       http://127.0.0.1:3000   (lineage: Assets -> Global asset lineage)
   MLflow UI        http://127.0.0.1:5000
   Ray dashboard    http://127.0.0.1:8265
   Serve endpoints  http://127.0.0.1:8000/fashion_mnist/  http://127.0.0.1:8000/tweet_sentiment/
   Stop everything: make stop
EOF
}

stop() {
  echo ">> stopping the embedded stack"
  for name in dagster-webserver dagster-daemon mlflow; do
    if alive "$name"; then
      pid=$(cat "$RUN/$name.pid")
      pkill -TERM -P "$pid" 2>/dev/null || true
      kill "$pid" 2>/dev/null || true
      echo "   $name stopped (pid $pid)"
    fi
    rm -f "$RUN/$name.pid"
  done
  ray_down
}

status() {
  for name in dagster-webserver dagster-daemon mlflow; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if pgrep -f -- "$RAY_TMP" >/dev/null; then echo "ray head: running"; else echo "ray head: stopped"; fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  ray-up) ray_up ;;
  ray-down) ray_down ;;
  *) echo "usage: $0 start|stop|status|ray-up|ray-down" >&2; exit 2 ;;
esac

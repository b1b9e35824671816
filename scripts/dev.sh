#!/usr/bin/env bash
# Embedded services on loopback only: `scripts/dev.sh start|stop|status|ray-up`.
#   Ray head (GCS 6379, Ray Client 10001, dashboard 8265) with Serve HTTP on 8000, MLflow UI 5000,
#   Dagster webserver 3000 and daemon (sensors); every port overridable (OCM_RAY_PORT, OCM_RAY_CLIENT_PORT,
#   OCM_RAY_DASHBOARD_PORT, OCM_RAY_AGENT_PORT, OCM_SERVE_PORT, OCM_DAGSTER_PORT, OCM_MLFLOW_PORT).
#   Each service runs in its own session; leader PIDs in $OCM_HOME/run, logs in $OCM_HOME/logs.
#   `stop` ends each session's whole process tree (scripts/devstack.py says how).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv
export OCM_HOME=${OCM_HOME:-$ROOT/.ocm}
export DAGSTER_HOME=${DAGSTER_HOME:-$OCM_HOME/dagster}
export RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export RAY_DATA_DISABLE_PROGRESS_BARS=${RAY_DATA_DISABLE_PROGRESS_BARS:-1}
case "${1:-start}" in
  start|ray-up)
    # ports, loopback host and Ray's single-node/token settings (ocm_resources/env.py); a bad OCM_* value
    # stops here with a message naming it
    env_lines=$("$VENV/bin/python" -m ocm_resources.env shell-env) || exit 2
    eval "$env_lines"
    mkdir -p "$DAGSTER_HOME"
    "$VENV/bin/python" -c "from ocm_resources.env import ensure_dagster_home; ensure_dagster_home()"
    ;;
  stop|status) ;;
  *) echo "usage: $0 start|stop|status|ray-up" >&2; exit 2 ;;
esac
exec "$VENV/bin/python" -m scripts.devstack "${1:-start}"

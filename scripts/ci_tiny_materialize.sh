#!/usr/bin/env bash
# "dagster CLI in CI": publish a tiny real Fashion-MNIST version into a fresh registry, then materialize the
# data slice of the graph for that version with the dagster CLI, exactly as a user would from a shell:
#
#   scripts/ci_tiny_materialize.sh          # uses .venv; state in a temporary OCM_HOME, removed at exit
#
# Fails (non-zero) when publishing, the materialization or a blocking check fails, and when the instance
# does not hold both materializations with passing checks afterwards. Needs the Debian package
# dataset-fashion-mnist (scripts/install.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN="$VENV/bin"
TAG=fashion-mnist-v1.0.0
PARTITIONS=fashion_mnist_versions

OCM_HOME=$(mktemp -d "${TMPDIR:-/tmp}/ocm-ci-XXXXXX")
if [ "${OCM_KEEP_HOME:-0}" != 1 ]; then trap 'rm -rf "$OCM_HOME"' EXIT; fi
export OCM_HOME OCM_ENV=local DAGSTER_HOME="$OCM_HOME/dagster"
export RAY_USAGE_STATS_ENABLED=0 DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset OCM_REGISTRY_URL OCM_DVC_REMOTE
mkdir -p "$DAGSTER_HOME"
printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"

echo ">> ocm registry publish fashion-mnist 1.0.0 (200 train / 50 val rows) into $OCM_HOME"
"$BIN/ocm" registry publish fashion-mnist 1.0.0 --train-rows 200 --val-rows 50

echo ">> add partition $TAG"
"$BIN/python" - "$PARTITIONS" "$TAG" <<'PY'
import sys

import dagster as dg

with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions(sys.argv[1], [sys.argv[2]])
PY

echo ">> dagster asset materialize"
"$BIN/dagster" asset materialize -m ocm_assets.definitions \
  --select 'fashion_mnist/dataset,fashion_mnist/preprocessing' --partition "$TAG"

echo ">> verify the instance"
"$BIN/python" - "$TAG" <<'PY'
import sys

import dagster as dg

tag = sys.argv[1]
with dg.DagsterInstance.get() as instance:
    for path in (["fashion_mnist", "dataset"], ["fashion_mnist", "preprocessing"]):
        key = dg.AssetKey(path)
        event = instance.get_latest_materialization_event(key)
        assert event is not None, f"{key.to_user_string()} was not materialized"
        mat = event.asset_materialization
        assert mat.partition == tag, f"{key.to_user_string()}: partition {mat.partition!r}, expected {tag!r}"
        print(f"   {key.to_user_string()} [{mat.partition}]: " + ", ".join(
            f"{k}={v.value}" for k, v in mat.metadata.items() if k in ("rows_train", "rows_val", "mean", "std")))
    records = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(["fashion_mnist", "dataset"]), "schema"), limit=1)
    assert records and records[0].status.value == "SUCCEEDED", f"schema check: {records}"
    evaluation = records[0].event.dagster_event.event_specific_data
    assert evaluation.passed, "the schema check did not pass"
print("ok")
PY

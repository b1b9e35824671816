"""Time from `git tag` (publishing a dataset version) to the endpoint answering with a model trained on it,
on demo-sized data, on the embedded stack. Goal: under 10 minutes on 2 cores.

Needs the local Ray head with Serve (`make dev` or a finished `make demo`, which leaves a champion serving).
Prints each stage side by side with the total:

    .venv/bin/python benchmarks/tag_to_endpoint.py [--version 1.9.0] [--epochs 1]
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default="1.9.0", help="fashion-mnist version to publish")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()

    from ocm_resources.env import ensure_dagster_home, local_paths

    ensure_dagster_home()
    import dagster as dg

    from ocm_assets.definitions import defs
    from ocm_assets.families import family
    from scripts.demo import demo_config, http, ocm, run_job, sensor_tick

    fam = family("fashion_mnist")
    url = f"http://127.0.0.1:8000/{fam.name}"
    instance = dg.DagsterInstance.get()
    cursors_file = local_paths().home / "demo-sensor-cursors.json"
    cursors = json.loads(cursors_file.read_text()) if cursors_file.exists() else {}
    # the sensor's view before the tag
    cursors[fam.name] = sensor_tick(defs, instance, fam.sensor_name, cursors.get(fam.name)).cursor
    stages = {}
    t0 = time.perf_counter()
    ocm("registry", "publish", fam.dataset, args.version, "--resplit-seed", args.version.replace(".", ""))
    stages["publish (parquet, dvc add/push, commit, tag)"] = time.perf_counter() - t0
    t = time.perf_counter()
    tick = sensor_tick(defs, instance, fam.sensor_name, cursors[fam.name])
    stages["sensor tick"] = time.perf_counter() - t
    (request,) = tick.run_requests
    t = time.perf_counter()
    retrain, trained, _ = run_job(defs, instance, fam.retrain_job_name, partition=request.partition_key,
                            tags={**request.tags, "dagster/run_key": request.run_key,
                                  "dagster/sensor_name": fam.sensor_name},
                            run_config=demo_config(fam, False, args.epochs))
    stages["retrain (validate, preprocess, DDP train, register)"] = time.perf_counter() - t
    model = trained.get(f"{fam.name}/model")
    if model is not None:
        print(f"  val accuracy {model.metadata['val_accuracy'].value:.4f} on "
              f"{model.metadata['train_rows'].value} training rows, "
              f"{model.metadata['images_per_second'].value:.0f} images/s")
    if not retrain.success:
        print("retrain failed")
        return 1
    t = time.perf_counter()
    _, rollout, _ = run_job(defs, instance, f"{fam.name}_rollout")
    tag = f"{fam.dataset}-v{args.version}"
    champion = rollout.get(f"{fam.name}/champion")
    if champion is not None and champion.metadata["decision"].value != "promoted":
        print("  the gate kept the current champion:", champion.metadata["reasons"].value)
    else:
        while http(f"{url}/info").get("data_version") != tag and time.perf_counter() - t < 600:
            time.sleep(1)
    stages["rollout (gate, reconfigure, checks) until /info shows it"] = time.perf_counter() - t
    cursors[fam.name] = tick.cursor
    cursors_file.write_text(json.dumps(cursors))
    total = time.perf_counter() - t0
    print(f"\n{'stage':<60}{'seconds':>10}")
    for name, secs in stages.items():
        print(f"{name:<60}{secs:>10.1f}")
    print(f"{'total: git tag -> endpoint serving the new version':<60}{total:>10.1f}   (goal < 600)")
    print(f"endpoint now: {http(f'{url}/info').get('model_uri')} "
          f"on {http(f'{url}/info').get('data_version')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

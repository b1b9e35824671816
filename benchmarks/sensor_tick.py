"""Registry sensor tick time with many tags (default 1,000) in a real git+DVC registry.
Goal: under 1 s per tick. Prints the first tick of the location's sensor (every tag new, capped at
MAX_RUNS_PER_TICK requests), the first tick of an uncapped sensor (1,000 partitions and run requests), the
re-tick after it (one run query over the 1,000 watched run keys), a steady re-tick (nothing new), and
`git ls-remote` alone as the floor.

    .venv/bin/python benchmarks/sensor_tick.py [--tags 1000] [--runs 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tags", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()

    import dagster as dg

    from ocm_assets.build import build_definitions
    from ocm_assets.families import family
    from ocm_assets.sensors import MAX_RUNS_PER_TICK, build_registry_sensor
    from tests.registry_helpers import image_version, new_registry

    fam = family("fashion_mnist")
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        pub, reg = new_registry(Path(tmp))
        tables, metadata = image_version(n_train=20, n_val=10)
        pub.publish("fashion-mnist", "1.0.0", tables, metadata)
        refs = "".join(
            f"create refs/tags/fashion-mnist-v2.{i // 100}.{i % 100} HEAD\n" for i in range(args.tags - 1)
        )
        subprocess.run(["git", "update-ref", "--stdin"], input=refs, text=True, cwd=pub.root, check=True)
        from ocm_resources.env import build_resources

        repo = build_definitions(resources={**build_resources("local"), "registry": reg}).get_repository_def()
        capped = repo.get_sensor_def(fam.sensor_name)
        uncapped = build_registry_sensor(fam, repo.get_job(fam.retrain_job_name), max_runs_per_tick=args.tags)

        def tick(cursor, sensor=uncapped):
            with dg.build_sensor_context(cursor=cursor, instance=instance, instance_ref=instance.get_ref(),
                                         repository_def=repo, resources={"registry": reg}) as ctx:
                t = time.perf_counter()
                result = sensor.evaluate_tick(ctx)
                return time.perf_counter() - t, result

        capped_t, capped_first = tick(None, capped)
        assert len(capped_first.run_requests) == min(MAX_RUNS_PER_TICK, args.tags), len(
            capped_first.run_requests)
        first_t, first = tick(None)
        assert len(first.run_requests) == args.tags, len(first.run_requests)
        for req in first.dynamic_partitions_requests:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        watching_t, watching = tick(first.cursor)
        assert not watching.run_requests
        steady = []
        for _ in range(args.runs):
            t, again = tick(watching.cursor)
            assert not again.run_requests
            steady.append(t)
        ls = []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run(["git", "ls-remote", "--tags", str(pub.root)], capture_output=True, check=True)
            ls.append(time.perf_counter() - t)
    print(f"registry sensor with {args.tags} tags (goal < 1 s per tick)")
    print(f"{'what':<44}{'seconds':>10}")
    print(f"{f'first tick, capped at {MAX_RUNS_PER_TICK} requests':<44}{capped_t:>10.3f}")
    print(f"{'first tick uncapped (partitions + requests)':<44}{first_t:>10.3f}")
    print(f"{f're-tick watching {args.tags} run keys':<44}{watching_t:>10.3f}")
    print(f"{'re-tick, nothing new (median)':<44}{statistics.median(steady):>10.3f}")
    print(f"{'git ls-remote --tags alone (median)':<44}{statistics.median(ls):>10.3f}")


if __name__ == "__main__":
    main()

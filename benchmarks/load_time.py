"""Code-location load time: `dagster definitions validate` on ocm vs a bare Dagster module with the same
number of assets and checks, side by side in one run. Goal: ocm ≤ 1.2× the bare module.

    .venv/bin/python benchmarks/load_time.py [--runs 5]
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
BIN = Path(sys.executable).parent

BARE = '''
import dagster as dg

def make(i):
    @dg.asset(key=["bare", f"a{i}"], check_specs=[dg.AssetCheckSpec("c", asset=["bare", f"a{i}"])])
    def _a():
        yield dg.Output(i)
        yield dg.AssetCheckResult(passed=True)
    return _a

defs = dg.Definitions(assets=[make(i) for i in range(N_ASSETS)])
'''


def timed(cmd, cwd, env, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from ocm_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    n_assets = len(graph.get_all_asset_keys())
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bare_defs.py").write_text(BARE.replace("N_ASSETS", str(n_assets)))
        env = {**os.environ, "DAGSTER_HOME": tmp, "PYTHONWARNINGS": "ignore", "PYTHONPATH": tmp}
        validate = [str(BIN / "dagster"), "definitions", "validate", "-m"]
        # interleave to share machine noise fairly
        ours, bare = [], []
        for _ in range(args.runs):
            bare += timed([*validate, "bare_defs"], tmp, env, 1)
            ours += timed([*validate, "ocm_assets.definitions"], ROOT, env, 1)
    mo, mb = statistics.median(ours), statistics.median(bare)
    print(f"dagster definitions validate, {n_assets} assets, median of {args.runs} runs")
    print(f"{'module':<28}{'median s':>10}{'min s':>10}{'max s':>10}")
    print(f"{'bare dagster module':<28}{mb:>10.2f}{min(bare):>10.2f}{max(bare):>10.2f}")
    print(f"{'ocm_assets.definitions':<28}{mo:>10.2f}{min(ours):>10.2f}{max(ours):>10.2f}")
    print(f"ratio ocm/bare: {mo / mb:.2f}x (goal <= 1.20x)")


if __name__ == "__main__":
    main()

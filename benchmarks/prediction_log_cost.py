"""What the prediction log costs at c=32: the same Serve endpoint with the log off and on, side by side.

The set-up is ``serve_throughput.py``'s (ResNet18 in a sqlite MLflow, a git+DVC registry, one real
Fashion-MNIST image per request, ``wrk`` at concurrency 32 on the replica's direct-ingress port). The log is
switched by hot-reconfiguring the ``prediction_log`` user_config key (same replica, same warm model), and the
two modes alternate for ``--rounds`` rounds, so drift in the machine's load hits both. Reported: median req/s
and p99 of each mode, the cost in per cent (must be <= 5 %), and the rows the log wrote (= requests answered
while it was on).

    nice -n 5 .venv/bin/python benchmarks/prediction_log_cost.py --duration 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import check_predict, free_port, setup_model, wrk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ocm-log-bench-"))
    print(f"setting up in {work} ...", flush=True)
    model = setup_model(work)
    lua = work / "post.lua"
    lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                   f"wrk.body = [==[{model['body']}]==]\n")
    log_root = work / "prediction_log"
    results: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        from ray import serve

        from ocm_ml.serve.deployments import build_app, config_hash, rebuild_app
        from ocm_ml.serve.prediction_log import read_log
        from ocm_resources.ray import start_loopback_ray
        from ocm_resources.serve_control import ServeControl

        start_loopback_ray(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                           log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        control = ServeControl(address=None)
        user_config = {"kind": "image", "model_uri": model["model_uri"],
                       "tracking_uri": model["tracking_uri"], "registry_url": model["registry_url"],
                       "torch_threads": args.torch_threads}
        control.run("fashion_mnist",
                    build_app("image", user_config, max_ongoing_requests=128, version="bench"),
                    config_hash(user_config))
        url = control.urls("fashion_mnist")["direct"][0] + "/predict"
        check_predict(url, model["body"])
        settings = {"root": str(log_root), "family": "fashion_mnist", "sample_rate": args.sample_rate}
        logged_requests = 0
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                control.reconfigure("fashion_mnist", {"prediction_log": settings if mode == "on" else None},
                                    rebuild_app)
                wrk(url, lua, args.concurrency, 2)  # warm-up
                r = wrk(url, lua, args.concurrency, args.duration)
                results[mode].append(r)
                if mode == "on":
                    logged_requests += r["requests"]
                print(f"  round {round_ + 1} log {mode:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                      f"p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}", flush=True)
        # flushes what is buffered
        control.reconfigure("fashion_mnist", {"prediction_log": None}, rebuild_app)
        from datetime import UTC, datetime, timedelta

        now = datetime.now(UTC)
        rows = read_log(str(log_root), "fashion_mnist", now - timedelta(hours=2),
                        now + timedelta(hours=1)).num_rows
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    off = statistics.median(r["rps"] for r in results["off"])
    on = statistics.median(r["rps"] for r in results["on"])
    cost = (off - on) / off * 100
    p99_off = statistics.median(r["p99_ms"] for r in results["off"])
    p99_on = statistics.median(r["p99_ms"] for r in results["on"])
    errors = sum(r["errors"] for rs in results.values() for r in rs)
    print()
    print(f"| c={args.concurrency} | req/s (median of {args.rounds}) | p99 ms (median) |")
    print("|---|---|---|")
    print(f"| log off | {off:.0f} | {p99_off:.1f} |")
    print(f"| log on (sample rate {args.sample_rate}) | {on:.0f} | {p99_on:.1f} |")
    print(f"\ncost of the prediction log: {cost:+.1f} % of req/s (must be <= 5 %): "
          f"{'PASS' if cost <= 5 else 'FAIL'}; errors {errors}")
    print(f"log rows written: {rows} (requests answered while on, incl. warm-ups: >= {logged_requests})")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cost_percent": cost, "rows": rows}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

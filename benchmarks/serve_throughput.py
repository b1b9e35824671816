"""/predict throughput and latency: ocm's Ray Serve endpoint vs a naive uvicorn + FastAPI + torch server.

Both serve the same ResNet18 (1-channel, Fashion-MNIST shape) from the same MLflow registry with the same
FastAPI app and contract; one real Fashion-MNIST test image per request (28x28 floats, ~6 KB of JSON);
``wrk`` as load generator (one thread, keep-alive, ``--latency``) at concurrency 1, 8 and 32, the targets
measured side by side, interleaved per level. The Ray head is the one ocm starts (``start_loopback_ray``:
loopback, token auth, and Serve's ingress from ``ocm_resources.env.serve_ingress_environment``).

Targets:
  naive        python -m ocm_ml.serve.naive (uvicorn, no batching, torch with --torch-threads)
  serve-direct ocm's deployment, adaptive batching, reached on the replica's own direct-ingress port
  contract     the same deployment at the contract URL (the Serve HTTP port, ``/fashion_mnist``): HAProxy in
               front of the replica by default; ``--ingress proxy`` measures Serve's Python proxy there
  serve-batch  direct ingress with Ray's @serve.batch instead of the adaptive batcher (hot-reconfigured;
               not in the default set)

    .venv/bin/python benchmarks/serve_throughput.py --duration 5     # ~3 min, table + "must show" on stdout
    .venv/bin/python benchmarks/serve_throughput.py --ingress proxy   # the contract URL through Serve's proxy

The last lines check issue 14's "must show": contract / naive at c=32 >= 4x with p99 < 100 ms, serve-direct
and contract / naive at c=1 >= 1.0x, 0 errors. docs/performance.md has the measured tables.

Everything lives in a temporary folder (MLflow sqlite, a git+DVC registry) and a private in-process Ray;
nothing is left running. Ports are picked free (never 8000/3000/5000/8265).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Read by Ray Serve at import and by the cluster processes at start (the ingress settings come from
# start_loopback_ray). Direct-ingress replicas wait 30 s on shutdown for load balancers to drain.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
# Ray starts its workers (Serve replicas included) at nice 15; the naive server runs at nice 0. On a shared
# machine that alone decides the race, so the replicas run at the naive server's priority.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_NAME = "bench.fashion-mnist-classifier"
ALL_TARGETS = ("naive", "serve-direct", "contract", "serve-batch")
DEFAULT_TARGETS = ("naive", "serve-direct", "contract")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 180, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s}s")


def setup_model(work: Path) -> dict:
    """A DVC registry version with real Fashion-MNIST stats and a ResNet18 registered in a sqlite MLflow."""
    import mlflow
    import numpy as np

    from ocm_ml import sources
    from ocm_ml.vision.model import build_resnet18
    from ocm_resources.registry import RegistryPublisher

    train, _ = sources.load_fashion_mnist()
    mean, std = sources.pixel_stats(train.images)
    pub = RegistryPublisher(work / "registry", remote_dir=work / "dvc-remote")
    pub.init()
    small = sources.ImageSplit(train.images[:256], train.labels[:256])
    splits = {"train": sources.image_table(small), "val": sources.image_table(small)}
    published = pub.publish("fashion-mnist", "1.0.0", splits,
                            {"normalization": {"mean": mean, "std": std},
                             "classes": list(sources.FASHION_MNIST_CLASSES)})
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.create_experiment("bench", artifact_location=(work / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        mlflow.set_tags({"dvc_data_version": published.tag, "dvc_commit": published.commit,
                         "dagster_run_id": "benchmark"})
        mlflow.pytorch.log_model(build_resnet18(10).eval(), name="model", serialization_format="pickle",
                                 registered_model_name=MODEL_NAME, pip_requirements=["torch"])
    image = train.images[int(np.argmax(train.labels == 9))]  # an ankle boot
    body = {"images": [[[round(float(v) / 1.01 + 0.13, 2) for v in row] for row in image]]}  # floats, ~6 KB
    return {"tracking_uri": tracking_uri, "registry_url": str(pub.root),
            "model_uri": f"models:/{MODEL_NAME}/1", "body": json.dumps(body)}


def wrk(url: str, lua: Path, concurrency: int, duration: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s", str(lua),
         url],
        capture_output=True, text=True, check=True,
    ).stdout

    def latency_ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m[1]), m[2]
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    total = int(re.search(r"(\d+) requests in", out)[1])
    non2xx = int(m[1]) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = non2xx + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "p50_ms": latency_ms("50"), "p99_ms": latency_ms("99"), "requests": total,
            "errors": errors}


def check_predict(url: str, body: str) -> dict:
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.loads(r.read())
    assert len(answer["predictions"]) == 1 and answer["model_uri"].startswith("models:/"), answer
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=f"any of {ALL_TARGETS}")
    parser.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                        help="on the contract port: HAProxy (ocm's default) or Serve's Python proxy")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads of both servers")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (registry, MLflow)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if args.ingress == "proxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {ALL_TARGETS}")

    work = Path(tempfile.mkdtemp(prefix="ocm-serve-bench-"))
    print(f"setting up in {work} ...", flush=True)
    model = setup_model(work)
    lua = work / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{model['body']}]==]\n"
    )
    urls: dict[str, str] = {}
    naive = None
    try:
        if "naive" in targets:
            port = free_port()
            naive = subprocess.Popen(
                [sys.executable, "-m", "ocm_ml.serve.naive", "--model-uri", model["model_uri"],
                 "--tracking-uri", model["tracking_uri"], "--registry-url", model["registry_url"],
                 "--port", str(port), "--torch-threads", str(args.torch_threads)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "naive.log", "wb"),
            )
            urls["naive"] = f"http://127.0.0.1:{port}"
            wait_http(f"{urls['naive']}/health", 600, proc=naive, log=work / "naive.log")

        serve_targets = [t for t in targets if t.startswith("serve")]
        if serve_targets:
            from ray import serve

            from ocm_ml.serve.deployments import build_app, config_hash, rebuild_app
            from ocm_resources.ray import start_loopback_ray
            from ocm_resources.serve_control import ServeControl

            start_loopback_ray(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                               log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
            control = ServeControl(address=None)
            user_config = {"kind": "image", "model_uri": model["model_uri"],
                           "tracking_uri": model["tracking_uri"], "registry_url": model["registry_url"],
                           "torch_threads": args.torch_threads, "max_batch_size": args.max_batch_size}
            control.run("fashion_mnist",
                        build_app("image", user_config, max_ongoing_requests=128, version="bench"),
                        config_hash(user_config))
            found = control.urls("fashion_mnist")
            if not found["direct"]:
                raise RuntimeError(f"no direct-ingress replica URL in {found}: is direct ingress on?")
            urls["serve-direct"] = urls["serve-batch"] = found["direct"][0]
            urls["contract"] = found["proxy"]
            wait_http(f"{found['proxy']}/health")

        for name in targets:
            check_predict(f"{urls[name]}/predict", model["body"])
        print(f"body {len(model['body'])} bytes; wrk -t1, {args.duration}s per level; targets: "
              + ", ".join(f"{t}={urls[t]}" for t in targets), flush=True)

        results: dict[str, dict[int, dict]] = {t: {} for t in targets}
        batcher = "adaptive"
        for level in levels:
            for name in targets:
                wanted = "serve" if name == "serve-batch" else "adaptive"
                if name != "naive" and wanted != batcher:
                    # Ray's batcher with the wait FACTS.md measured (2 ms); the adaptive one never waits.
                    control.reconfigure("fashion_mnist", {"batcher": wanted, "batch_wait_timeout_s": 0.002
                                                          if wanted == "serve" else 0.0}, rebuild_app)
                    batcher = wanted
                url = f"{urls[name]}/predict"
                wrk(url, lua, level, 2)  # warm-up
                results[name][level] = r = wrk(url, lua, level, args.duration)
                print(f"  c={level:<3} {name:<13} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                      f"p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
    finally:
        if naive is not None:
            naive.terminate()
            naive.wait(timeout=30)
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    header = "| concurrency | " + " | ".join(f"{t} req/s (p50 / p99 ms)" for t in targets)
    if "naive" in targets:
        header += " | " + " | ".join(f"{t} / naive" for t in targets if t != "naive")
    print(header + " |")
    print("|" + "---|" * (header.count("|")))
    for level in levels:
        cells = [f"{results[t][level]['rps']:.0f} ({results[t][level]['p50_ms']:.1f} / "
                 f"{results[t][level]['p99_ms']:.1f})" for t in targets]
        if "naive" in targets:
            base = results["naive"][level]["rps"]
            cells += [f"{results[t][level]['rps'] / base:.2f}x" for t in targets if t != "naive"]
        print(f"| {level} | " + " | ".join(cells) + " |")
    errors = sum(r["errors"] for per in results.values() for r in per.values())
    print(f"\nerrors (non-2xx + socket) over all runs: {errors}")
    print(f"ingress on the contract port: {args.ingress}; load average {os.getloadavg()[0]:.1f} at the end")
    checks = must_show(results, levels, errors)
    for line in checks:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"urls": urls, "results": results, "duration_s": args.duration,
                                         "torch_threads": args.torch_threads, "ingress": args.ingress,
                                         "must_show": checks}, indent=2))


def must_show(results: dict[str, dict[int, dict]], levels: list[int], errors: int) -> list[str]:
    """Issue 14's serving ratios, each measured in this run, with whether it holds."""
    if "naive" not in results:
        return []
    out = []

    def ratio(target: str, level: int) -> float | None:
        if level not in results.get(target, {}) or level not in results["naive"]:
            return None
        return results[target][level]["rps"] / results["naive"][level]["rps"]

    top = max(levels)
    if (r := ratio("contract", top)) is not None:
        p99 = results["contract"][top]["p99_ms"]
        ok = r >= 4.0 and p99 < 100.0
        out.append(f"must show: contract / naive at c={top} = {r:.2f}x (>= 4x), p99 {p99:.1f} ms (< 100 ms): "
                   + ("yes" if ok else "NO"))
    for target in ("serve-direct", "contract"):
        if (r := ratio(target, 1)) is not None:
            verdict = "yes" if r >= 1.0 else "NO"
            out.append(f"must show: {target} / naive at c=1 = {r:.2f}x (>= 1.0x): {verdict}")
    out.append(f"must show: 0 errors: {'yes' if errors == 0 else f'NO ({errors})'}")
    return out

if __name__ == "__main__":
    main()

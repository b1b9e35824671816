"""Peak RSS of the Ray Train workers with the training set at 1x and at Nx rows: streaming keeps it flat.

    .venv/bin/python benchmarks/worker_memory.py                       # 2,000 vs 20,000 rows, 1 epoch each
    .venv/bin/python benchmarks/worker_memory.py --rows 6000 --factor 10   # 60,000 rows: Fashion-MNIST's size

Runs ``ocm_ml.vision.train.train_fashion_mnist`` (2 workers x 1 CPU, 1 epoch) twice on synthetic parquet data
and, from the driver, samples every training worker's ``VmHWM`` (kernel-kept peak RSS) and the Ray Data read
tasks' RSS twice a second. A worker that loaded its whole shard would grow by about the shard's size (uint8:
784 B/row; float32 after normalization: 3,136 B/row); a streaming one stays flat.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN, STD = 0.2, 0.3
MiB = 1024**2


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """Samples this process's Ray descendants: training workers (VmHWM) and Ray Data read workers (VmRSS)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.worker_peak: dict[int, int] = {}
        self.data_peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                    if "RayTrainWorker" in title:
                        peak = _status_kib(child.pid, "VmHWM") * 1024
                        self.worker_peak[child.pid] = max(self.worker_peak.get(child.pid, 0), peak)
                    elif "ReadParquet" in title or "SplitCoordinator" in title:
                        rss = _status_kib(child.pid, "VmRSS") * 1024
                        self.data_peak[child.pid] = max(self.data_peak.get(child.pid, 0), rss)
                except (OSError, psutil.Error):
                    continue
            self._stop.wait(self.interval)


def measure(rows: int, val_rows: int, batch_size: int, folder: Path, seed: int) -> dict:
    from ocm_ml.vision.synthetic import write_synthetic_parquet
    from ocm_ml.vision.train import TrainSettings, train_fashion_mnist

    train = write_synthetic_parquet(folder / f"train-{rows}.parquet", rows, seed=seed)
    val = write_synthetic_parquet(folder / f"val-{rows}.parquet", val_rows, seed=seed + 1)
    with PeakSampler() as sampler:
        result = train_fashion_mnist(
            train,
            val,
            MEAN,
            STD,
            TrainSettings(
                num_workers=2, cpus_per_worker=1, batch_size=batch_size, epochs=1, seed=seed, max_failures=0
            ),
            storage_path=str(folder / "results"),
            run_name=f"memory-{rows}",
        )
    if not sampler.worker_peak:
        raise RuntimeError("no Ray Train worker process was sampled")
    return {
        "rows": rows,
        "train_file_mib": os.path.getsize(train) / MiB,
        "worker_peak_mib": max(sampler.worker_peak.values()) / MiB,
        "workers_sampled": len(sampler.worker_peak),
        "data_peak_mib": max(sampler.data_peak.values(), default=0) / MiB,
        "images_per_second": result.images_per_second,
        "elapsed": result.elapsed_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="training rows at 1x (default 2000)")
    parser.add_argument(
        "--factor", type=int, default=10, help="the larger run has rows x factor (default 10)"
    )
    parser.add_argument("--val-rows", type=int, default=256, help="validation rows, the same for both runs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ray

    from ocm_resources.ray import single_node_ray, system_config

    single_node_ray()  # loopback only, as ocm's own heads
    ray.init(  # as ocm's Ray heads run (ocm_resources.ray)
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * MiB,
        log_to_driver=False,
        _system_config=system_config(),
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [
                measure(n, args.val_rows, args.batch_size, Path(tmp), args.seed)
                for n in (args.rows, args.rows * args.factor)
            ]
    finally:
        ray.shutdown()

    print()
    header = (
        f"{'train rows':>10} {'parquet MiB':>11} {'shard as f32 MiB':>16} {'worker peak RSS MiB':>19} "
        f"{'data task peak MiB':>18} {'img/s':>7} {'elapsed s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        shard_f32 = r["rows"] / 2 * 784 * 4 / MiB
        print(
            f"{r['rows']:>10} {r['train_file_mib']:>11.1f} {shard_f32:>16.1f} {r['worker_peak_mib']:>19.0f} "
            f"{r['data_peak_mib']:>18.0f} {r['images_per_second']:>7.0f} {r['elapsed']:>9.1f}"
        )
    small, large = results
    growth = large["worker_peak_mib"] / small["worker_peak_mib"]
    print(
        f"\nworker peak RSS growth for {args.factor}x rows: {growth:.2f}x "
        f"(+{large['worker_peak_mib'] - small['worker_peak_mib']:.0f} MiB; goal < 1.5x)"
    )


if __name__ == "__main__":
    main()

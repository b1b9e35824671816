"""Driver of the two-node DDP test (tests/cluster/test_two_node_ddp.py), run in its own process so that its
Ray connection cannot meet a Ray another test of the session started:

    python -m tests.cluster.ddp_driver --address 127.0.0.1:PORT --train T.parquet --val V.parquet \\
        --mean M --std S --storage /shared/folder --out result.json
    ... --storage s3://bucket/prefix --s3-endpoint http://127.0.0.1:PORT   # keys from AWS_* variables

Connects to the cluster, trains ``ocm_ml.vision.train.train_fashion_mnist`` with 2 workers (checkpoints in a
folder, or on S3 through ``CheckpointStorage``, as the model asset does), loads the best checkpoint back, and
writes JSON: the cluster's nodes, the node of every Ray Train worker (seen live after the first epoch and in
the GCS actor table after the run) and the result.
"""

from __future__ import annotations

import argparse
import json
import math


def train_worker_nodes() -> dict[str, str]:
    """{actor id: node id} of the Ray Train worker actors this job created (alive or dead)."""
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return {
        actor_id: info["Address"]["NodeID"]
        for actor_id, info in state.actors().items()
        if info["ActorClassName"] == "RayTrainWorker" and info["JobID"] == job and info["Address"]["NodeID"]
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    for name in ("address", "train", "val", "storage", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--mean", type=float, required=True)
    p.add_argument("--std", type=float, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--s3-endpoint", default=None)
    args = p.parse_args(argv)

    import os

    import ray

    from ocm_ml.vision.lightning_module import LIGHTNING_CHECKPOINT_NAME
    from ocm_ml.vision.train import TrainSettings, train_fashion_mnist
    from ocm_resources.storage import CheckpointStorage

    storage = CheckpointStorage(
        base_path=args.storage, endpoint_override=args.s3_endpoint, region=os.environ.get("AWS_REGION"),
        access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )
    storage_path = storage.path_for("fashion_mnist", "fashion-mnist-v1.0.0", "two-node")

    ray.init(address=args.address, log_to_driver=False)
    nodes = {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}
    live: dict[str, str] = {}

    def on_epoch(record: dict) -> None:
        live.update(train_worker_nodes())  # the worker group is alive while epochs are reported

    settings = TrainSettings(num_workers=2, cpus_per_worker=1, batch_size=32, epochs=args.epochs,
                             learning_rate=2e-3, max_failures=0)
    result = train_fashion_mnist(args.train, args.val, args.mean, args.std, settings,
                                 storage_path=storage_path, storage_filesystem=storage.filesystem(),
                                 run_name="two-node-ddp", on_epoch=on_epoch)
    after = train_worker_nodes()
    network = result.load_model()  # read back from the storage
    report = {
        "nodes": nodes,
        "workers_live": live,
        "workers_after": after,
        "storage_path": storage_path,
        "checkpoint_path": result.checkpoint_path,
        "checkpoint_file": f"{result.checkpoint_path}/{LIGHTNING_CHECKPOINT_NAME}",
        "loaded_parameters": sum(p.numel() for p in network.parameters()),
        "run_path": result.run_path,
        "num_workers": result.num_workers,
        "epochs": len(result.history),
        "val_accuracy": result.val_accuracy if math.isfinite(result.val_accuracy) else None,
        "train_rows": result.train_rows,
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

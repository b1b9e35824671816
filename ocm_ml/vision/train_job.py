"""The vision training driver as a Ray Job: ``python -m ocm_ml.vision.train_job '<spec json>'``.

A step that reaches Ray only through Ray Client (``ray://``) cannot run the training driver itself: Ray Data
needs a core worker, which a Ray Client driver lacks (ray-project/ray#48682). The step submits this module
as a Ray Job instead (``ocm_resources.ray.RayHead.run_job``); it runs on the head, connects to its cluster,
calls :func:`ocm_ml.vision.train.train_fashion_mnist` and writes ``TrainResult.to_dict()`` as JSON to
``spec["result_path"]`` in checkpoint storage, where the step reads it back.

Spec keys: ``train_url``, ``val_url``, ``mean``, ``std``, ``settings`` (``TrainSettings`` fields),
``storage_path``, ``run_name``, ``result_path``, and ``s3`` (None for local storage, else
``{"endpoint_override", "scheme", "region"}``). The S3 keys are never in the spec: the job's runtime
environment carries them, and pyarrow's S3 client finds them there (AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import json
import sys
from typing import Any

EPOCH_PREFIX = "ocm-epoch "


def storage_filesystem(s3: dict[str, Any] | None):
    """The pyarrow filesystem of checkpoint storage: S3 from the spec's endpoint, or the local disk."""
    from pyarrow import fs

    if not s3:
        return None
    return fs.S3FileSystem(
        endpoint_override=s3.get("endpoint_override"), scheme=s3.get("scheme") or "https",
        region=s3.get("region"),
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as the spec says (Ray already connected) and write the result; returns what it wrote."""
    from pyarrow import fs

    from ocm_ml.vision.settings import TrainSettings
    from ocm_ml.vision.train import train_fashion_mnist

    filesystem = storage_filesystem(spec.get("s3"))

    def on_epoch(record: dict[str, float]) -> None:
        print(EPOCH_PREFIX + json.dumps(record), flush=True)

    result = train_fashion_mnist(
        spec["train_url"], spec["val_url"], float(spec["mean"]), float(spec["std"]),
        TrainSettings(**spec["settings"]), storage_path=spec["storage_path"], run_name=spec["run_name"],
        storage_filesystem=filesystem, on_epoch=on_epoch,
    )
    payload = result.to_dict()
    target = filesystem or fs.LocalFileSystem()
    parent = spec["result_path"].rsplit("/", 1)[0]
    target.create_dir(parent, recursive=True)
    with target.open_output_stream(spec["result_path"]) as out:
        out.write(json.dumps(payload).encode())
    return payload


def main(argv: list[str] | None = None) -> int:
    import ray

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ocm_ml.vision.train_job '<spec json>'", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    ray.init(address="auto")  # the job's cluster (RAY_ADDRESS set by the job supervisor)
    try:
        payload = run(spec)
    finally:
        ray.shutdown()
    print(f"ocm-result {spec['result_path']}: val_accuracy={payload['val_accuracy']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The naive baseline for benchmarks: plain uvicorn + FastAPI + torch, one process, no batching.

Same app (:func:`ocm_ml.serve.app.create_app`), same model bundle, same /predict contract as the Serve
deployment; each request runs its own forward pass in FastAPI's thread pool, the way a plain ``def``
route would. Run it with::

    python -m ocm_ml.serve.naive --kind image --model-uri models:/name/1 \\
        --tracking-uri sqlite:////abs/mlflow.db --registry-url /abs/registry --port 8100
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ocm_ml.serve.app import create_app
from ocm_ml.serve.loading import ModelBundle, ServeConfig, load_bundle


class NaiveBackend:
    """Holds one bundle; every request is its own forward pass."""

    def __init__(self, config: ServeConfig, bundle: ModelBundle | None = None):
        self.kind = config.kind
        self.config = config
        self.limits = config.limits
        self.started_at = time.monotonic()
        self.last_reload_error: str | None = None
        self.bundle = bundle if bundle is not None else load_bundle(config)

    async def infer(self, inputs: Any) -> tuple[ModelBundle, Any, Any]:
        bundle = self.bundle
        first, second = await run_in_threadpool(bundle.predict, inputs)
        return bundle, first, second

    def serving_info(self) -> dict[str, Any]:
        import torch

        return {
            "batcher": "none",
            "server": "naive uvicorn",
            "max_batch": self.limits.max_batch,
            "torch_threads": torch.get_num_threads(),
        }


def create_naive_app(user_config: dict[str, Any], torch_threads: int | None = None) -> FastAPI:
    config = ServeConfig.from_user_config(user_config)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    return create_app(NaiveBackend(config))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kind", choices=["image", "text"], default="image")
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--registry-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--torch-threads", type=int)
    args = parser.parse_args(argv)
    app = create_naive_app(
        {
            "kind": args.kind,
            "model_uri": args.model_uri,
            "tracking_uri": args.tracking_uri,
            "registry_url": args.registry_url,
        },
        torch_threads=args.torch_threads,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

"""The code location of the daemon end-to-end test (tests/serve/test_daemon_e2e.py), loaded by the real
``dagster-daemon`` from a workspace file, and by every run process it launches: the real definitions for one
image family of its own, on the registry, MLflow home, Ray and Serve port the test put in the environment."""

from __future__ import annotations

import os

import dagster as dg

from ocm_assets.build import build_definitions
from ocm_assets.families import Family
from ocm_ml.promotion import Gate
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.ray import RayHead
from ocm_resources.registry import DvcRegistry
from ocm_resources.serve_control import ServeControl
from ocm_resources.storage import CheckpointStorage

#: Route /fashion_mnist_daemon; no floors (320 real training rows, one epoch), a new version must win by 1
#: point.
FAMILY = Family("fashion_mnist_daemon", "fashion-mnist", "image", "daemon e2e test family",
                gate=Gate(floors={"accuracy": 0.0}, win_margin=0.01))



@dg.definitions
def defs() -> dg.Definitions:
    home = os.environ["OCM_DAEMON_TEST_HOME"]
    ray_address = os.environ["OCM_DAEMON_TEST_RAY"]
    return build_definitions(
        resources={
            "registry": DvcRegistry(repo_url=os.environ["OCM_REGISTRY_URL"]),
            "ray_cluster": RayHead(address=ray_address, keep_alive=True),
            "mlflow": LocalMlflow(home=home, env_name="daemon"),
            "checkpoints": CheckpointStorage(base_path=f"{home}/ray-results"),
            "serve": ServeControl(address=ray_address,
                                  http_port=int(os.environ["OCM_DAEMON_TEST_SERVE_PORT"])),
        },
        families=(FAMILY,),
    )

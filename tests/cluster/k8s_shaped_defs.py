"""The definitions of the k8s-shaped run (tests/cluster/test_k8s_shaped.py), rebuilt in every step process.

Dagster's multiprocess executor starts one process per step, as ``k8s_job_executor`` starts one pod per step;
each process imports this module and builds the same definitions from the environment the test set, the way
a step pod builds them from the ConfigMap and Secrets: ``OCM_ENV=cluster`` and ``OCM_EXECUTOR=multiprocess``
(``ocm_resources.env.build_executor``), the shared S3 IO manager of ``ocm_resources.env.cluster_io_manager``
(bucket, endpoint and keys from the environment), Ray only through ``ray://`` (``OCM_K8S_RAY_CLIENT``) and the
head's Ray Jobs API (``OCM_RAY_DASHBOARD_URL``, where training runs), Serve on the long-lived head through the
same Ray Client address.
"""

from __future__ import annotations

import os

import dagster as dg

from ocm_assets.families import Family

#: An image family of its own (route /fashion_mnist_k8s), so the test never touches other tests' apps.
FAMILY = Family("fashion_mnist_k8s", "fashion-mnist", "image", "k8s-shaped test family")


def definitions() -> dg.Definitions:
    from ocm_assets.build import build_definitions
    from ocm_resources.env import cluster_io_manager
    from ocm_resources.mlflow import LocalMlflow
    from ocm_resources.ray import RayHead
    from ocm_resources.registry import DvcRegistry
    from ocm_resources.serve_control import ServeControl
    from ocm_resources.storage import CheckpointStorage

    ray_client = os.environ["OCM_K8S_RAY_CLIENT"]
    assert ray_client.startswith("ray://"), ray_client
    # training over ray:// runs as a Ray Job through the head's dashboard (Ray Data needs a driver there)
    resources = {
        "registry": DvcRegistry(repo_url=os.environ["OCM_REGISTRY_URL"]),
        "ray_cluster": RayHead(address=ray_client, keep_alive=True,
                               jobs_url=os.environ["OCM_RAY_DASHBOARD_URL"]),
        "mlflow": LocalMlflow(home=os.environ["OCM_K8S_HOME"], env_name="k8s"),
        "checkpoints": CheckpointStorage(
            base_path=dg.EnvVar("OCM_CHECKPOINT_PATH"), endpoint_override=os.environ["OCM_S3_ENDPOINT"],
            region=os.environ["AWS_REGION"], access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
            secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
        ),
        "serve": ServeControl(address=ray_client, http_host="127.0.0.1",
                              http_port=int(os.environ["OCM_SERVE_PORT"])),
        **cluster_io_manager(),
    }
    return build_definitions(resources=resources, families=(FAMILY,))


def retrain_job() -> dg.JobDefinition:
    return definitions().resolve_job_def(FAMILY.retrain_job_name)


def rollout_job() -> dg.JobDefinition:
    return definitions().resolve_job_def(f"{FAMILY.name}_rollout")

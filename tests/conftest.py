"""Shared fixtures: every test runs against its own temporary OCM_HOME; nothing touches ./.ocm or the network."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["OCM_ENV"] = "local"

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_ocm_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ocm-home")
    old = os.environ.get("OCM_HOME")
    os.environ["OCM_HOME"] = str(home)
    os.environ.pop("OCM_REGISTRY_URL", None)
    yield home
    if old is None:
        os.environ.pop("OCM_HOME", None)
    else:
        os.environ["OCM_HOME"] = old


def init_local_ray():
    """The session's in-process Ray: 4 logical CPUs on the 2 cores (2 training workers and Serve replicas
    must fit at once, as on the `make dev` head), a small object store, no dashboard. `address="local"`
    ignores a head left behind by a killed `ray start`; like every head ocm starts it listens on 127.0.0.1
    only, with token auth (`start_loopback_ray`)."""
    import ray

    from ocm_resources.ray import start_loopback_ray, system_config

    if not ray.is_initialized():
        start_loopback_ray(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
            _system_config=system_config(),
        )
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray shared by every test that needs Ray (see init_local_ray)."""
    ray = init_local_ray()
    yield ray
    ray.shutdown()

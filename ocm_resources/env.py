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
    """The resources of the code location for one environment."""
    import dagster as dg

    from ocm_resources.registry import DvcRegistry

    env = env or ocm_env()
    if env == "local":
        return {"registry": DvcRegistry(repo_url=registry_url())}
    if env == "cluster":
        if not os.environ.get("OCM_REGISTRY_URL"):
            raise ConfigurationError("OCM_ENV=cluster needs OCM_REGISTRY_URL (the team's registry git URL)")
        return {
            "registry": DvcRegistry(
                repo_url=dg.EnvVar("OCM_REGISTRY_URL"),
                remote=os.environ.get("OCM_DVC_REMOTE") or None,
            )
        }
    raise ConfigurationError(f"OCM_ENV={env!r} is not one of {', '.join(ENVIRONMENTS)}")

"""MLflow tracking and model registry: the :class:`MlflowTracking` interface, with :class:`LocalMlflow`
(sqlite + a local artifact folder under ``OCM_HOME``) and :class:`RemoteMlflow` (an MLflow server).

ocm does not use dagster-mlflow: it only offers the legacy ``mlflow_tracking`` resource, which ends runs
early in multi-op jobs (dagster-io/dagster#21872) and searches runs on every step (#22633).
``mlflow`` is imported inside methods only; importing this module stays cheap.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field, PrivateAttr

from ocm_ml.contract import LINEAGE_TAGS  # the run tags every ocm training run carries (DESIGN.md)

if TYPE_CHECKING:
    from mlflow import ActiveRun, MlflowClient
    from mlflow.entities.model_registry import ModelVersion



class MlflowError(RuntimeError):
    """MLflow could not do what ocm asked; the message says what to check."""


class MlflowUnavailableError(MlflowError):
    """The tracking or registry server does not answer."""


def redact_uri(uri: str) -> str:
    """``uri`` without a password or token in its user-info part, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    if not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def git_code_version(folder: Path | None = None) -> str | None:
    """The git commit of the code location's checkout, with ``-dirty`` when tracked files changed; None
    outside a git checkout (an image: there the build records it, see the Dockerfile)."""
    import subprocess

    root = folder or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _package_version() -> str:
    try:
        return metadata.version("ocm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _safe_path_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


class MlflowTracking(dg.ConfigurableResource):
    """Interface of MLflow tracking + model registry; assets annotate this type.

    Implementations: :class:`LocalMlflow` (embedded default) and :class:`RemoteMlflow` (an MLflow server).

    Example::

        @dg.asset
        def model(mlflow_tracking: MlflowTracking):
            tags = mlflow_tracking.lineage_tags(dvc_data_version=md5, dvc_commit=commit,
                                                dagster_run_id=context.run_id, dagster_partition=tag)
            with mlflow_tracking.start_run("fashion-mnist", run_name="train", tags=tags) as run:
                ...  # mlflow.log_metric(...), mlflow.pytorch.log_model(..., name="model")
            version = mlflow_tracking.register(f"runs:/{run.info.run_id}/model", "fashion-mnist", tags)
    """

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (`http(s)://…` server, `sqlite:///…`). Required for a remote "
        "server; LocalMlflow derives it from `home` when unset.",
    )
    registry_uri: str | None = Field(
        default=None, description="Model registry URI when it differs from the tracking URI."
    )
    artifact_location: str | None = Field(
        default=None,
        description="Artifact root for experiments ocm creates (each gets `<root>/<experiment name>`); "
        "unset: the server's default artifact root.",
    )
    env_name: str = Field(
        default="local",
        description="Environment prefix of registered model names: `<env_name>.<dataset>-classifier`.",
    )
    ui_url: str | None = Field(
        default=None,
        description="Base URL of the MLflow UI for run links, e.g. http://127.0.0.1:5000; no links when "
        "unset.",
    )
    docker_image_tag: str | None = Field(
        default=None, description="Image tag recorded in the `docker_image_tag` run tag (the image's own "
        "OCM_IMAGE_TAG); 'local' when unset."
    )
    code_version: str | None = Field(
        default=None, description="The `code_version` run tag: the git commit the image was built from "
        "(OCM_CODE_VERSION); unset: the git commit of this checkout (+`-dirty`), else the package version."
    )
    connect_timeout: float = Field(
        default=5.0, description="Seconds to wait for an HTTP tracking/registry server to answer /health."
    )
    registration_timeout: float = Field(
        default=300.0, description="Seconds to wait for a new model version to become READY."
    )

    _client: MlflowClient | None = PrivateAttr(default=None)

    # -- where things are -------------------------------------------------------------------------

    def resolved_tracking_uri(self) -> str:
        if not self.tracking_uri:
            raise MlflowError(f"{type(self).__name__} needs a tracking_uri")
        return self.tracking_uri

    def resolved_registry_uri(self) -> str:
        return self.registry_uri or self.resolved_tracking_uri()

    def resolved_artifact_location(self) -> str | None:
        return self.artifact_location

    def _prepare(self) -> None:
        """Make the backend usable before the first call (folders, reachability)."""

    # -- lifecycle --------------------------------------------------------------------------------

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.configure()
        if context.log is not None:
            context.log.info(
                f"MLflow tracking at {redact_uri(self.resolved_tracking_uri())}"
                + (f", registry at {redact_uri(self.registry_uri)}" if self.registry_uri else "")
            )

    def configure(self) -> MlflowClient:
        """Point the process's MLflow (the fluent API too) at this backend; returns a client for it."""
        import mlflow

        tracking_uri = self.resolved_tracking_uri()
        registry_uri = self.resolved_registry_uri()
        if self._client is None:
            self._prepare()
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        if self._client is None:
            self._client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        return self._client

    @property
    def client(self) -> MlflowClient:
        return self._client if self._client is not None else self.configure()

    # -- tracking ---------------------------------------------------------------------------------

    def experiment(self, name: str) -> str:
        """The id of experiment ``name``; created (with the artifact location) when missing, restored
        when deleted."""
        from mlflow.exceptions import MlflowException

        client = self.client
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        root = self.resolved_artifact_location()
        location = f"{root.rstrip('/')}/{_safe_path_part(name)}" if root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":  # created concurrently by another step
                found = client.get_experiment_by_name(name)
                if found is not None:
                    return found.experiment_id
            raise

    @contextmanager
    def start_run(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> Iterator[ActiveRun]:
        """``mlflow.start_run`` in experiment ``experiment`` (a name); the run ends FINISHED, or FAILED
        when the block raises. ``nested`` starts a child of the active run, ``parent_run_id`` a child of
        that run (the active one, or any run when none is active, e.g. in a Ray worker)."""
        import mlflow

        experiment_id = self.experiment(experiment)
        if parent_run_id is not None and mlflow.active_run() is not None:
            nested = True  # MLflow insists on nested=True when the parent is the active run
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags={k: str(v) for k, v in (tags or {}).items()},
            nested=nested,
            parent_run_id=parent_run_id,
        ) as run:
            yield run

    def run_url(self, run_id: str, experiment_id: str) -> str | None:
        if not self.ui_url:
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def lineage_tags(
        self,
        dvc_data_version: str,
        dvc_commit: str,
        dagster_run_id: str,
        dagster_partition: str | None,
        docker_image_tag: str | None = None,
        code_version: str | None = None,
    ) -> dict[str, str]:
        """The lineage run/model-version tags of DESIGN.md, all strings. ``docker_image_tag`` defaults to the
        resource's field, else "local"; ``code_version`` to the field, else the git commit of the checkout
        (``-dirty`` when changed), else the package version."""
        tags = {
            "dvc_data_version": dvc_data_version,
            "dvc_commit": dvc_commit,
            "dagster_run_id": dagster_run_id,
            "dagster_partition": dagster_partition or "",
            "docker_image_tag": docker_image_tag or self.docker_image_tag or "local",
            "code_version": code_version or self.code_version or git_code_version() or _package_version(),
        }
        return {key: str(tags[key]) for key in LINEAGE_TAGS}

    # -- registry ---------------------------------------------------------------------------------

    def model_name(self, dataset: str) -> str:
        return f"{self.env_name}.{dataset}-classifier"

    def register(self, model_uri: str, dataset: str, tags: Mapping[str, Any] | None = None) -> ModelVersion:
        """Register ``model_uri`` (``runs:/…``, ``models:/m-…``) as a new version of the dataset's model,
        wait until it is READY and tag it."""
        import mlflow

        name = self.model_name(dataset)
        self.configure()
        str_tags = {k: str(v) for k, v in (tags or {}).items()}
        version = mlflow.register_model(
            model_uri, name, await_registration_for=int(self.registration_timeout), tags=str_tags
        )
        version = self._await_ready(name, version.version)
        for key, value in str_tags.items():  # servers that ignore create-time tags still get them
            if version.tags.get(key) != value:
                self.client.set_model_version_tag(name, version.version, key, value)
        return self.client.get_model_version(name, version.version)

    def _await_ready(self, name: str, version: str) -> ModelVersion:
        deadline = time.monotonic() + self.registration_timeout
        while True:
            mv = self.client.get_model_version(name, version)
            if mv.status == "READY":
                return mv
            if mv.status == "FAILED_REGISTRATION":
                raise MlflowError(
                    f"registering version {version} of {name} failed: {mv.status_message or 'no message'}"
                )
            if time.monotonic() > deadline:
                raise MlflowError(
                    f"version {version} of {name} is still {mv.status} after {self.registration_timeout:.0f}s"
                )
            time.sleep(1.0)

    def set_alias(self, dataset: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(self.model_name(dataset), alias, str(version))

    def get_alias(self, dataset: str, alias: str) -> ModelVersion | None:
        """The version behind ``alias``; None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.model_name(dataset), alias)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in exc.message.lower():
                return None
            raise

    def delete_alias(self, dataset: str, alias: str) -> None:
        """Remove ``alias``; nothing happens when it does not exist."""
        if self.get_alias(dataset, alias) is not None:
            self.client.delete_registered_model_alias(self.model_name(dataset), alias)

    def version(self, dataset: str, version: str | int) -> ModelVersion:
        return self.client.get_model_version(self.model_name(dataset), str(version))

    def version_of_partition(self, dataset: str, partition: str,
                             run_id: str | None = None) -> ModelVersion | None:
        """The newest version registered for ``partition`` (its ``dagster_partition`` tag), or exactly the one
        the Dagster run ``run_id`` registered when given; None when there is none."""
        name = self.model_name(dataset).replace("'", "\\'")
        filters = [f"name = '{name}'", f"tags.dagster_partition = '{partition}'"]
        if run_id:
            filters.append(f"tags.dagster_run_id = '{run_id}'")
        found = self.client.search_model_versions(" AND ".join(filters), max_results=1,
                                                  order_by=["version_number DESC"])
        return found[0] if found else None

    def latest_version(self, dataset: str) -> ModelVersion | None:
        """The highest version number of the dataset's model; None when nothing is registered."""
        name = self.model_name(dataset).replace("'", "\\'")
        found = self.client.search_model_versions(
            f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
        )
        return found[0] if found else None

    def model_uri(self, dataset: str, alias: str) -> str:
        """``models:/<name>@<alias>``, what ``mlflow.pyfunc.load_model`` and Serve load."""
        return f"models:/{self.model_name(dataset)}@{alias}"


class LocalMlflow(MlflowTracking):
    """MLflow without a server: a sqlite backend and an artifact folder under the OCM home folder.

    Example::

        mlflow_tracking = LocalMlflow(home=".ocm", ui_url="http://127.0.0.1:5000")
        # sqlite:///<home>/mlflow/mlflow.db, artifacts in <home>/mlflow/artifacts;
        # browse with `mlflow ui --backend-store-uri sqlite:///<home>/mlflow/mlflow.db`
    """

    home: str = Field(description="OCM home folder (OCM_HOME); MLflow's state lives in `<home>/mlflow`.")

    def mlflow_dir(self) -> Path:
        return Path(self.home).expanduser().resolve() / "mlflow"

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.mlflow_dir() / 'mlflow.db'}"

    def resolved_artifact_location(self) -> str | None:
        return self.artifact_location or (self.mlflow_dir() / "artifacts").as_uri()

    def _prepare(self) -> None:
        artifacts = self.resolved_artifact_location()
        folders = [self.mlflow_dir()]
        if artifacts and artifacts.startswith("file:"):
            folders.append(Path(urllib.parse.unquote(urllib.parse.urlsplit(artifacts).path)))
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MlflowError(f"cannot create the MLflow folder {folder}: {exc}") from exc


class RemoteMlflow(MlflowTracking):
    """An MLflow tracking server (with its registry), reached over HTTP(S).

    Example::

        mlflow_tracking = RemoteMlflow(
            tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
            env_name="prod",
            ui_url=dg.EnvVar("MLFLOW_UI_URL"),
            tracking_token=dg.EnvVar("MLFLOW_TRACKING_TOKEN"),
        )

    Artifact credentials (S3/MinIO: ``AWS_*``, ``MLFLOW_S3_ENDPOINT_URL``) are read by MLflow from the
    environment, or not needed when the server proxies artifacts.
    """

    tracking_uri: str = Field(  # pyright: ignore[reportIncompatibleVariableOverride]
        description="MLflow server URI, e.g. http://mlflow.mlops.svc:5000 (use dg.EnvVar)."
    )
    tracking_token: str | None = Field(
        default=None,
        description="Bearer token for the server (dg.EnvVar); exported as MLFLOW_TRACKING_TOKEN.",
    )
    tracking_username: str | None = Field(
        default=None, description="Basic-auth user (dg.EnvVar); exported as MLFLOW_TRACKING_USERNAME."
    )
    tracking_password: str | None = Field(
        default=None, description="Basic-auth password (dg.EnvVar); exported as MLFLOW_TRACKING_PASSWORD."
    )

    def _prepare(self) -> None:
        import os

        for value, var in (
            (self.tracking_token, "MLFLOW_TRACKING_TOKEN"),
            (self.tracking_username, "MLFLOW_TRACKING_USERNAME"),
            (self.tracking_password, "MLFLOW_TRACKING_PASSWORD"),
        ):
            if value:
                os.environ[var] = value  # MLflow's REST client reads credentials from the environment only
        uris = {self.resolved_tracking_uri()}
        uris.add(self.resolved_registry_uri())
        for uri in sorted(uris):
            self.check_reachable(uri)

    def check_reachable(self, uri: str) -> None:
        """Fail fast (``connect_timeout``) when an HTTP(S) server does not answer ``/health``; MLflow's own
        client would retry for minutes."""
        if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
            return
        parts = urllib.parse.urlsplit(uri)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
        try:
            with urllib.request.urlopen(health, timeout=self.connect_timeout) as response:
                response.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # behind auth, but a server answered
                return
            raise MlflowUnavailableError(
                f"MLflow server at {redact_uri(uri)} answered /health with HTTP {exc.code}; "
                "check that the URI points at an MLflow tracking server"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MlflowUnavailableError(
                f"MLflow server at {redact_uri(uri)} is unreachable ({reason}, timeout "
                f"{self.connect_timeout:.0f}s): check that the server is running and that the tracking URI "
                "(MLFLOW_TRACKING_URI in the cluster environment) is right and reachable from this process"
            ) from None

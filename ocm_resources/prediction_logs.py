"""Where the endpoint replicas write their prediction logs, and how steps read them: a folder (embedded
default ``$OCM_HOME/prediction_log``) or ``s3://bucket/prefix`` on the cluster.

The replicas get :meth:`PredictionLogStore.replica_settings` in their Serve ``user_config`` (no
credentials: the Ray nodes' environment has them); steps read through :meth:`PredictionLogStore.filesystem`.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field


class PredictionLogStore(dg.ConfigurableResource):
    """The prediction-log store of the endpoints (one folder per family, hourly parquet partitions).

    Example::

        PredictionLogStore(root="/abs/.ocm/prediction_log")                        # embedded
        PredictionLogStore(root="s3://ocm-logs/prediction_log", s3_endpoint="http://minio:9000",
                           access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
                           secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"))   # cluster
        PredictionLogStore(root=None)                                              # logging off
    """

    root: str | None = Field(default=None,
                             description="Folder or s3://bucket/prefix; None turns logging off.")
    sample_rate: float = Field(default=1.0,
                               description="Share of requests each replica records (1.0: every one).")
    flush_interval_s: float = Field(default=5.0, description="Seconds between a replica's parquet writes.")
    s3_endpoint: str | None = Field(default=None, description="S3-compatible endpoint, e.g. http://minio:9000.")
    s3_region: str | None = Field(default=None, description="S3 region.")
    access_key_id: str | None = Field(default=None,
                                      description="S3 access key for readers; set it through dg.EnvVar.")
    secret_access_key: str | None = Field(default=None,
                                          description="S3 secret key; set it through dg.EnvVar.")
    metrics_url: str | None = Field(
        default=None, description="Where Prometheus scrapes the serving cluster's Ray/Serve metrics "
        "(recorded on every endpoint materialization), e.g. http://127.0.0.1:8080/metrics.")

    @property
    def enabled(self) -> bool:
        return bool(self.root)

    def replica_settings(self, family: str) -> dict[str, Any] | None:
        """The ``prediction_log`` user_config value for ``family``'s replicas (None: off)."""
        if not self.root:
            return None
        out: dict[str, Any] = {"root": self._resolved_root(), "family": family,
                               "sample_rate": self.sample_rate, "flush_interval_s": self.flush_interval_s}
        if self.s3_endpoint:
            out["s3_endpoint"] = self.s3_endpoint
        if self.s3_region:
            out["s3_region"] = self.s3_region
        return out

    def _resolved_root(self) -> str:
        if self.root is None or "://" in self.root:
            return self.root or ""
        from pathlib import Path

        return str(Path(self.root).expanduser().resolve())

    def base_path(self) -> str:
        """The root as a path of :meth:`filesystem` (bucket/prefix for S3)."""
        root = self._resolved_root()
        return root.removeprefix("s3://").rstrip("/") if root.startswith("s3://") else root

    def filesystem(self) -> Any:
        """A pyarrow filesystem for the root (S3 with the configured keys, else the local one)."""
        from pyarrow import fs

        if not self.root:
            raise dg.Failure("the prediction log is off (PredictionLogStore.root is None): set "
                             "OCM_PREDICTION_LOG (see docs/monitoring.md) and redeploy the endpoint")
        if not self.root.startswith("s3://"):
            return fs.LocalFileSystem()
        scheme, endpoint = "https", self.s3_endpoint
        if endpoint and "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
        return fs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=self.s3_region,
                               access_key=self.access_key_id, secret_key=self.secret_access_key)

"""Where Ray Train and Tune write checkpoints: a local folder (embedded default) or S3/MinIO.

Every materialization gets its own folder ``<base>/<family>/<partition>/<dagster run id>`` so concurrent
partitions and re-runs never collide.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field


class CheckpointStorage(dg.ConfigurableResource):
    """Checkpoint storage for Ray Train/Tune ``RunConfig(storage_path, storage_filesystem)``.

    Example::

        CheckpointStorage(base_path="/data/ocm/ray-results")                       # local
        CheckpointStorage(base_path="s3://ocm-checkpoints/ray", endpoint_override="http://minio:9000",
                          access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
                          secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"))   # S3 / MinIO
    """

    base_path: str = Field(description="Local folder or s3://bucket/prefix for checkpoints.")
    endpoint_override: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, SeaweedFS), e.g. http://127.0.0.1:9000."
    )
    region: str | None = Field(default=None, description="S3 region.")
    access_key_id: str | None = Field(default=None, description="S3 access key; set it through dg.EnvVar.")
    secret_access_key: str | None = Field(default=None,
                                          description="S3 secret key; set it through dg.EnvVar.")

    @property
    def is_s3(self) -> bool:
        return self.base_path.startswith("s3://")

    def path_for(self, family: str, partition: str, run_id: str) -> str:
        """The per-materialization folder (without scheme for S3: pyarrow filesystems take bucket/key)."""
        safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in (family, partition, run_id)]
        if self.is_s3:
            return "/".join([self.base_path.removeprefix("s3://").rstrip("/"), *safe])
        path = Path(self.base_path).expanduser().resolve().joinpath(*safe)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def s3_options(self) -> dict[str, Any] | None:
        """Where the S3 storage is, without its keys (None for local folders): ``endpoint_override``
        (host[:port]), ``scheme`` and ``region``, as pyarrow's ``S3FileSystem`` takes them."""
        if not self.is_s3:
            return None
        scheme, endpoint = "https", self.endpoint_override
        if endpoint and "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
        return {"endpoint_override": endpoint or None, "scheme": scheme, "region": self.region}

    def credential_env(self) -> dict[str, str]:
        """The S3 keys as the AWS variables pyarrow reads (empty for local folders or keys from the pod's
        role)."""
        pairs = (("AWS_ACCESS_KEY_ID", self.access_key_id), ("AWS_SECRET_ACCESS_KEY", self.secret_access_key))
        return {name: value for name, value in pairs if self.is_s3 and value}

    def filesystem(self) -> Any | None:
        """A pyarrow filesystem for S3 (None for local folders)."""
        options = self.s3_options()
        if options is None:
            return None
        from pyarrow import fs

        return fs.S3FileSystem(**options, access_key=self.access_key_id, secret_key=self.secret_access_key)

"""Dagster IO manager of the cluster path: every step's outputs on S3, so the next step's pod can read them.

Under ``k8s_job_executor`` (or any executor that runs steps in separate processes on separate machines) the
default filesystem IO manager writes each output to the disk of the pod that made it; the next step runs in
another pod and finds nothing. :class:`S3IOManager` pickles outputs to
``s3://<bucket>/<prefix>/<asset key path>/<partition key>`` (one object per asset, or per partition) with
dagster-aws's ``PickledObjectS3IOManager``, and reads them back from there.

It is a factory so that loading the code location stays cheap: boto3 and dagster-aws are imported when a step
starts, not when the definitions load. Credentials are fields set through ``dg.EnvVar`` (resolved in the
step, never stored in the definitions or run config); without them boto3's own chain (environment, instance
role) applies.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field


class S3IOManager(dg.ConfigurableIOManagerFactory):
    """Pickled step outputs on S3 / MinIO.

    Example::

        S3IOManager(bucket="ocm-dagster-io", prefix="dagster/io", endpoint_url="http://minio:9000",
                    access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
                    secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"))
    """

    bucket: str = Field(description="S3 bucket of the step outputs (OCM_IO_BUCKET).")
    prefix: str = Field(default="dagster/io", description="Key prefix inside the bucket (OCM_IO_PREFIX).")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO), e.g. http://minio.ocm.svc.cluster.local:9000."
    )
    region: str | None = Field(default=None, description="S3 region.")
    access_key_id: str | None = Field(default=None, description="S3 access key; set it through dg.EnvVar.")
    secret_access_key: str | None = Field(default=None,
                                          description="S3 secret key; set it through dg.EnvVar.")

    def client(self) -> Any:
        """A boto3 S3 client for this bucket's endpoint and credentials."""
        from dagster_aws.s3 import S3Resource

        return S3Resource(
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        ).get_client()

    def create_io_manager(self, context: dg.InitResourceContext) -> dg.UPathIOManager:
        from dagster_aws.s3.io_manager import PickledObjectS3IOManager

        # lists the prefix once: wrong credentials, endpoint or bucket fail here, when the step starts
        return PickledObjectS3IOManager(s3_bucket=self.bucket, s3_session=self.client(),
                                        s3_prefix=self.prefix.strip("/") or None)

"""Fixtures of the cluster-path tests: a real S3 server (moto in server mode) on 127.0.0.1."""

import pytest

from tests.cluster.helpers import BUCKETS, REGION, SECRETS


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on a free port (the S3 REST API over HTTP, in a thread of this process), with the
    buckets the cluster path uses: {"endpoint", "client" (boto3), "region"}."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=REGION,
            aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
        )
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "client": client, "region": REGION}
    finally:
        server.stop()


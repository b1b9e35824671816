"""The S3 path against a real S3 server on 127.0.0.1 (moto in server mode: the S3 REST API over HTTP,
offline): checkpoint storage through pyarrow, and the data registry's DVC remote on S3 (dvc-s3), read by the
same DvcRegistry and data assets as the embedded stack."""

import shutil
import subprocess
import sys

import dagster as dg
import pyarrow.parquet as pq
import pytest

from ocm_assets.build import family_assets
from ocm_assets.data import dataset_key, preprocessing_key
from ocm_assets.families import family
from ocm_resources.env import build_resources
from ocm_resources.registry import DvcRegistry
from ocm_resources.storage import CheckpointStorage
from tests.cluster.helpers import REGION, SECRETS, set_env
from tests.cluster.helpers import s3_keys as keys
from tests.registry_helpers import image_version, new_registry

FASHION = family("fashion_mnist")


def test_checkpoint_storage_writes_and_reads_through_s3(s3):
    storage = CheckpointStorage(
        base_path="s3://ocm-checkpoints/ray-results", endpoint_override=s3["endpoint"], region=REGION,
        access_key_id=SECRETS["AWS_ACCESS_KEY_ID"], secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
    )
    folder = storage.path_for("fashion_mnist", "fashion-mnist-v1.0.0", "run-1")
    assert folder == "ocm-checkpoints/ray-results/fashion_mnist/fashion-mnist-v1.0.0/run-1"
    fs = storage.filesystem()
    payload = bytes(range(256)) * 64
    with fs.open_output_stream(f"{folder}/checkpoint_000000/model.ckpt") as out:
        out.write(payload)
    with fs.open_input_stream(f"{folder}/checkpoint_000000/model.ckpt") as src:
        assert src.read() == payload
    # the object is in the bucket, seen by another S3 client
    assert keys(s3, "ocm-checkpoints", "ray-results/") == [
        "ray-results/fashion_mnist/fashion-mnist-v1.0.0/run-1/checkpoint_000000/model.ckpt"
    ]


def test_cluster_resource_resolves_its_env_vars_and_reaches_s3(s3, monkeypatch, tmp_path):
    set_env(monkeypatch, {
        "OCM_ENV": "cluster", "OCM_REGISTRY_URL": str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
        "OCM_CHECKPOINT_PATH": "s3://ocm-checkpoints/env", "OCM_S3_ENDPOINT": s3["endpoint"],
        "AWS_REGION": REGION, "RAY_ADDRESS": "127.0.0.1:9", **SECRETS,
    })
    checkpoints = build_resources()["checkpoints"]
    with dg.build_resources({"checkpoints": checkpoints}) as live:
        fs = live.checkpoints.filesystem()
        folder = live.checkpoints.path_for("fashion_mnist", "fashion-mnist-v2.0.0", "run-2")
        with fs.open_output_stream(f"{folder}/state.json") as out:
            out.write(b"{}")
    assert keys(s3, "ocm-checkpoints", "env/") == ["env/fashion_mnist/fashion-mnist-v2.0.0/run-2/state.json"]


def test_wrong_endpoint_fails_loudly(tmp_path):
    storage = CheckpointStorage(base_path="s3://ocm-checkpoints/x", endpoint_override="http://127.0.0.1:9",
                                access_key_id="a", secret_access_key="b", region=REGION)
    fs = storage.filesystem()
    with pytest.raises(OSError):
        with fs.open_output_stream("ocm-checkpoints/x/file") as out:
            out.write(b"x")


def dvc(cwd, *args):
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def s3_registry(s3, tmp_path_factory):
    """A registry whose DVC remote `s3remote` is the S3 server; the local remote and cache are removed, so
    every read must come from S3."""
    root = tmp_path_factory.mktemp("s3-registry")
    pub, _ = new_registry(root)
    dvc(pub.root, "remote", "add", "s3remote", "s3://ocm-dvc/registry")
    dvc(pub.root, "remote", "modify", "s3remote", "endpointurl", s3["endpoint"])
    dvc(pub.root, "remote", "modify", "s3remote", "region", REGION)
    subprocess.run(["git", "commit", "-q", "-am", "DVC remote on S3"], cwd=pub.root, check=True)
    tables, metadata = image_version(n_train=120, n_val=40)
    version = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(name, SECRETS[name])
        dvc(pub.root, "push", "-r", "s3remote")
    shutil.rmtree(pub.remote_dir)
    shutil.rmtree(pub.root / ".dvc" / "cache", ignore_errors=True)
    return pub, version


def test_dvc_remote_on_s3_serves_the_registry(s3, s3_registry, monkeypatch):
    pub, version = s3_registry
    stored = keys(s3, "ocm-dvc", "registry/")
    assert len(stored) == 2 and all(k.startswith("registry/files/md5/") for k in stored)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, SECRETS[name])
    registry = DvcRegistry(repo_url=str(pub.root), remote="s3remote")
    resolved = registry.resolve(version.tag)
    info = registry.file_info(resolved, "fashion-mnist/train.parquet")
    assert info.url.startswith("s3://ocm-dvc/registry/files/md5/")
    assert info.url.removeprefix("s3://ocm-dvc/") in stored
    with registry.open(resolved, "fashion-mnist/train.parquet") as fh:
        assert pq.read_table(fh).num_rows == 120


def test_data_assets_materialize_from_the_s3_remote(s3_registry, monkeypatch):
    pub, version = s3_registry
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, SECRETS[name])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(FASHION.partitions_name, [version.tag])
    data_assets = [a for a in family_assets(FASHION)
                   if a.key in (dataset_key(FASHION), preprocessing_key(FASHION))]
    result = dg.materialize(
        data_assets, partition_key=version.tag, instance=instance,
        resources={"registry": DvcRegistry(repo_url=str(pub.root), remote="s3remote")},
    )
    assert result.success
    mats = {e.asset_key: e.materialization for e in result.get_asset_materialization_events()}
    dataset = mats[dataset_key(FASHION)].metadata
    assert dataset["file_urls"].value["train"].startswith("s3://ocm-dvc/registry/")
    assert dataset["rows_train"].value == 120
    assert all(check.passed for check in result.get_asset_check_evaluations())

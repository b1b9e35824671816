"""The Tune best checkpoint stays in the checkpoint storage: a local folder under storage_path, or its s3://
URI on the cluster; never a temp folder of the step's pod (ocm_ml/text/tune.py::_local_checkpoint_dir)."""

import tempfile
from pathlib import Path

import pyarrow.fs

from tests.cluster.helpers import REGION, SECRETS


def test_best_checkpoint_is_referenced_where_tune_stored_it(s3, tmp_path, monkeypatch):
    from ray.train import Checkpoint

    from ocm_ml.text.tune import _local_checkpoint_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    local = tmp_path / "storage" / "trial" / "checkpoint_000001"
    local.mkdir(parents=True)
    assert _local_checkpoint_dir(Checkpoint.from_directory(str(local)), str(tmp_path)) == str(local)

    scheme, _, endpoint = s3["endpoint"].partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=REGION,
                                 access_key=SECRETS["AWS_ACCESS_KEY_ID"],
                                 secret_key=SECRETS["AWS_SECRET_ACCESS_KEY"])
    key = "ocm-checkpoints/ray-results/tweet_sentiment/v1/run/trial/checkpoint_000001"
    with fs.open_output_stream(f"{key}/model.safetensors") as out:
        out.write(b"weights")
    uri = _local_checkpoint_dir(Checkpoint(path=key, filesystem=fs), None)
    assert uri == f"s3://{key}"
    # nothing was copied into a temp folder of this process
    assert list(Path(tempfile.gettempdir()).iterdir()) == []
    # a reader gets it back through the checkpoint storage's filesystem, into a folder it removes after use
    with tempfile.TemporaryDirectory() as tmp:
        pyarrow.fs.copy_files(uri.removeprefix("s3://"), tmp, source_filesystem=fs)
        assert (Path(tmp) / "model.safetensors").read_bytes() == b"weights"

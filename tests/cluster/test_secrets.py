"""No secret set through the environment shows up in what a cluster run leaves behind: the Dagster event log
(run logs, resource logs, materialization and check metadata), the run record, the console, the MLflow run
(params, tags, metrics) or the MLflow server's log.

The run uses the real cluster resources (OCM_ENV=cluster, build_resources) with a token and basic-auth
credentials for MLflow and access keys for S3: RemoteMlflow against an `mlflow server` on 127.0.0.1 (slow:
the server takes a minute to start on a loaded machine) or, in the quick variant, against a sqlite tracking
URI; CheckpointStorage against an S3 server on 127.0.0.1; a git+DVC registry. It materializes the data assets and a probe
that does what `fashion_mnist/model` does with these resources (lineage tags, the same MLflow params,
a checkpoint folder on S3) without training."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from ocm_assets.build import family_assets
from ocm_assets.data import dataset_key, partitions_for, preprocessing_key
from ocm_assets.families import family
from ocm_resources.env import build_resources
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.storage import CheckpointStorage
from tests.cluster.helpers import IDENTITIES, REGION, SECRETS, free_port, s3_keys, set_env
from tests.registry_helpers import image_version, new_registry

FASHION = family("fashion_mnist")
PROBE = dg.AssetKey(["fashion_mnist", "secrets_probe"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (sqlite backend, proxied local artifacts) on a free port; killed by process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not come up:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {"url": url, "log": root / "server.log"}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()


@dg.asset(
    key=PROBE,
    partitions_def=partitions_for(FASHION),
    ins={"dataset": dg.AssetIn(dataset_key(FASHION)), "preprocessing": dg.AssetIn(preprocessing_key(FASHION))},
)
def secrets_probe(
    context: dg.AssetExecutionContext, mlflow: MlflowTracking, checkpoints: CheckpointStorage,
    dataset: dict, preprocessing: dict,
) -> dg.MaterializeResult:
    """The resource calls of fashion_mnist/model, minus training: lineage tags and the same params."""
    import mlflow as mlflow_lib

    from ocm_assets.training import VisionTrainConfig, lineage

    tag = context.partition_key
    storage_path = checkpoints.path_for(FASHION.name, tag, context.run.run_id)
    fs = checkpoints.filesystem()
    with fs.open_output_stream(f"{storage_path}/checkpoint_000000/checkpoint.ckpt") as out:
        out.write(b"weights")
    tags = lineage(mlflow, context, dataset)
    with mlflow.start_run(f"{mlflow.env_name}.{FASHION.dataset}", run_name=f"{tag} probe", tags=tags) as run:
        mlflow_lib.log_params({**VisionTrainConfig().model_dump(), "data_tag": tag, "mean": preprocessing["mean"],
                               "std": preprocessing["std"], "storage_path": storage_path})
        mlflow_lib.log_metric("val_accuracy", 0.5)
    context.log.info(f"probe run {run.info.run_id} at {storage_path}")
    return dg.MaterializeResult(metadata={
        "mlflow_run_id": run.info.run_id, "checkpoint_path": storage_path,
        "mlflow_url": mlflow.run_url(run.info.run_id, run.info.experiment_id) or "",
    })


@pytest.mark.parametrize("tracking", ["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def test_no_secret_in_logs_metadata_or_mlflow(tracking, request, s3, tmp_path, monkeypatch, capfd):
    if tracking == "server":
        server = request.getfixturevalue("mlflow_server")
        tracking_uri, server_log = server["url"], server["log"].read_text
    else:
        tracking_uri, server_log = f"sqlite:///{tmp_path / 'mlflow.db'}", None
    pub, _ = new_registry(tmp_path)
    tables, metadata = image_version(n_train=120, n_val=40)
    version = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    set_env(monkeypatch, {
        "OCM_ENV": "cluster",
        "OCM_REGISTRY_URL": str(pub.root),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_UI_URL": "http://127.0.0.1:5000",
        "OCM_CHECKPOINT_PATH": "s3://ocm-checkpoints/secrets-test",
        "OCM_S3_ENDPOINT": s3["endpoint"],
        "AWS_REGION": REGION,
        "RAY_ADDRESS": f"127.0.0.1:{free_port()}",  # named, never connected: no asset here needs Ray
        **SECRETS,
        **IDENTITIES,
    })
    resources = build_resources()
    assert type(resources["mlflow"]).__name__ == "RemoteMlflow"
    data_assets = [a for a in family_assets(FASHION) if a.key in (dataset_key(FASHION), preprocessing_key(FASHION))]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(FASHION.partitions_name, [version.tag])
    result = dg.materialize(
        [*data_assets, secrets_probe], partition_key=version.tag, resources=resources, instance=instance,
    )
    assert result.success
    # the secrets were really used: the MLflow client was handed the token, the checkpoint reached S3
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == SECRETS["MLFLOW_TRACKING_TOKEN"]
    probe = {e.asset_key: e.materialization for e in result.get_asset_materialization_events()}[PROBE]
    checkpoint = probe.metadata["checkpoint_path"].value
    assert s3_keys(s3, "ocm-checkpoints", checkpoint.split("/", 1)[1]) == [
        checkpoint.split("/", 1)[1] + "/checkpoint_000000/checkpoint.ckpt"
    ]

    # everything the run left behind, as text
    records = instance.all_logs(result.run_id)
    texts = {
        "event log": "\n".join(serialize_value(r) for r in records),
        "run record": serialize_value(instance.get_run_by_id(result.run_id)),
        "console": "".join(capfd.readouterr()),
    }
    if server_log is not None:
        texts["mlflow server log"] = server_log()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(probe.metadata["mlflow_run_id"].value)
    texts["mlflow run"] = repr(run.to_dictionary())
    experiment = client.get_experiment(run.info.experiment_id)
    texts["mlflow experiment"] = repr(experiment)

    # the texts hold the real content (so a leak would be seen) ...
    assert version.tag in texts["event log"] and version.tag in texts["mlflow run"]
    assert run.data.params["storage_path"] == checkpoint and run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["mlflow.user"] == IDENTITIES["MLFLOW_TRACKING_USERNAME"]  # MLflow's design
    if server_log is not None:
        assert "/api/2.0/mlflow/runs/create" in texts["mlflow server log"]
    assert any("probe run" in (r.user_message or "") for r in records)
    # ... and no secret value in any of them
    leaks = [(where, name) for where, text in texts.items() for name, value in SECRETS.items() if value in text]
    assert leaks == []

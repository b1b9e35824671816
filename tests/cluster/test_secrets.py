"""No secret set through the environment shows up in what a cluster run leaves behind: the Dagster event log
(run logs, resource logs, materialization and check metadata), the run record, the console, the MLflow run
(params, tags, metrics) or the MLflow server's log.

The run uses the real cluster resources (OCM_ENV=cluster, build_resources) with a token and basic-auth
credentials for MLflow and access keys for S3: RemoteMlflow against a basic-auth `mlflow server` on 127.0.0.1
(slow: the server takes a minute to start on a loaded machine) or, in the quick variant, against a sqlite
tracking URI; CheckpointStorage against an S3 server on 127.0.0.1; a git+DVC registry. It materializes the
data assets and a probe that does what `fashion_mnist/model` does with these resources (lineage tags, the same
MLflow params, a checkpoint folder on S3) without training."""


import dagster as dg
import pytest
from dagster._serdes import serialize_value

from ocm_assets.build import family_assets
from ocm_assets.data import dataset_key, partitions_for, preprocessing_key
from ocm_assets.families import family
from ocm_ml.contract import DatasetMetadata, DatasetVersion
from ocm_resources.env import build_resources
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.storage import CheckpointStorage
from tests.cluster.helpers import IDENTITIES, REGION, SECRETS, s3_keys, set_env
from tests.mlflow_server import mlflow_server as mlflow_server_process
from tests.ports import closed_port
from tests.registry_helpers import image_version, new_registry

FASHION = family("fashion_mnist")
PROBE = dg.AssetKey(["fashion_mnist", "secrets_probe"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with MLflow's basic-auth app; its admin is the run's MLflow user."""
    with mlflow_server_process(tmp_path_factory.mktemp("mlflow-server"),
                               username=IDENTITIES["MLFLOW_TRACKING_USERNAME"],
                               password=SECRETS["MLFLOW_TRACKING_PASSWORD"]) as server:
        yield server


@dg.asset(
    key=PROBE,
    partitions_def=partitions_for(FASHION),
    ins={"dataset": dg.AssetIn(dataset_key(FASHION)),
         "preprocessing": dg.AssetIn(preprocessing_key(FASHION))},
)
def secrets_probe(
    context: dg.AssetExecutionContext, mlflow: MlflowTracking, checkpoints: CheckpointStorage,
    dataset: DatasetVersion, preprocessing: DatasetMetadata,
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
        mlflow_lib.log_params({**VisionTrainConfig().model_dump(), "data_tag": tag,
                               "mean": preprocessing.normalization.mean,
                               "std": preprocessing.normalization.std, "storage_path": storage_path})
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
        tracking_uri, server_log = server.url, server.log_text
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
        "RAY_ADDRESS": f"127.0.0.1:{closed_port()}",  # named, never connected: no asset here needs Ray
        **SECRETS,
        **IDENTITIES,
    })
    resources = build_resources()
    assert type(resources["mlflow"]).__name__ == "RemoteMlflow"
    data_assets = [a for a in family_assets(FASHION)
                   if a.key in (dataset_key(FASHION), preprocessing_key(FASHION))]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(FASHION.partitions_name, [version.tag])
    result = dg.materialize(
        [*data_assets, secrets_probe], partition_key=version.tag, resources=resources, instance=instance,
    )
    assert result.success
    # the secrets were really used: the checkpoint reached S3, and (server) the basic-auth MLflow server,
    # which answers 401 to anyone else, authenticated the run's requests as our user (checked below)
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
        assert_credentials_travelled(tracking_uri, run.info.experiment_id)
    assert any("probe run" in (r.user_message or "") for r in records)
    # ... and no secret value in any of them
    leaks = [(where, name) for where, text in texts.items()
             for name, value in SECRETS.items() if value in text]
    assert leaks == []


def assert_credentials_travelled(url: str, experiment_id: str) -> None:
    """The server saw the run's credentials: the run exists on it, and it refuses a request for its
    experiment without credentials or with a wrong password, and answers the right ones."""
    import base64
    import urllib.error
    import urllib.request

    def status(path: str, user: str | None, password: str | None) -> int:
        request = urllib.request.Request(f"{url}{path}")
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    user, password = IDENTITIES["MLFLOW_TRACKING_USERNAME"], SECRETS["MLFLOW_TRACKING_PASSWORD"]
    path = f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
    assert status(path, None, None) == 401
    assert status(path, user, "wrong-password") == 401
    assert status(path, user, password) == 200

"""MLflow resource: a real sqlite-backed MLflow in a temporary folder (runs, nested runs, a pyfunc model
registered, aliased and loaded back), and fast failures for servers that do not answer."""

import http.server
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from ocm_resources.mlflow import (
    LINEAGE_TAGS,
    LocalMlflow,
    MlflowTracking,
    MlflowUnavailableError,
    RemoteMlflow,
    redact_uri,
)
from tests.ports import closed_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DESIGN_TAGS = {
    "dvc_data_version",
    "dvc_commit",
    "dagster_run_id",
    "dagster_partition",
    "docker_image_tag",
    "code_version",
}


@pytest.fixture(scope="module")
def ocm_home(tmp_path_factory) -> Path:
    """One sqlite backend for the module: creating its tables takes seconds."""
    return tmp_path_factory.mktemp("mlflow-home")


@contextmanager
def http_server(status: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_importing_resources_imports_neither_mlflow_nor_ray():
    code = (
        "import sys, ocm_resources.mlflow, ocm_resources.ray\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'ray', 'kubernetes'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT, timeout=120)


@pytest.mark.parametrize(
    ("env_name", "dataset", "expected"),
    [
        ("local", "fashion-mnist", "local.fashion-mnist-classifier"),
        ("prod", "tweet-sentiment", "prod.tweet-sentiment-classifier"),
    ],
)
def test_model_name(tmp_path, env_name, dataset, expected):
    assert LocalMlflow(home=str(tmp_path), env_name=env_name).model_name(dataset) == expected


def test_lineage_tags_are_the_design_tags_with_defaults(tmp_path):
    from importlib import metadata

    tracking = LocalMlflow(home=str(tmp_path))
    tags = tracking.lineage_tags("md5-abc", "c0ffee", "run-1", "fashion-mnist-v1.0.0")
    assert set(tags) == DESIGN_TAGS == set(LINEAGE_TAGS)
    assert tags["docker_image_tag"] == "local"
    # issue 12: the git commit of the code location (the package version says nothing about the code)
    from ocm_resources.mlflow import git_code_version

    assert tags["code_version"] == git_code_version() and tags["code_version"] != metadata.version("ocm")
    assert tags["dagster_partition"] == "fashion-mnist-v1.0.0"

    tagged = LocalMlflow(home=str(tmp_path), docker_image_tag="ghcr.io/x/ocm:abc")
    tags = tagged.lineage_tags("m", "c", "r", None, code_version="1.2.3")
    assert tags["docker_image_tag"] == "ghcr.io/x/ocm:abc"
    assert tags["code_version"] == "1.2.3"
    assert tags["dagster_partition"] == ""
    assert tagged.lineage_tags("m", "c", "r", "p", docker_image_tag="v9")["docker_image_tag"] == "v9"


@pytest.mark.filterwarnings("ignore:.*Add type hints")
def test_local_mlflow_runs_register_alias_and_load(ocm_home):
    import mlflow
    import pandas as pd

    class TextLength(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [len(text) for text in model_input["text"]]

    home = ocm_home
    tracking = LocalMlflow(home=str(home), ui_url="http://127.0.0.1:5000/")
    tracking.configure()
    assert (home / "mlflow" / "mlflow.db").is_file()
    assert (home / "mlflow" / "artifacts").is_dir()
    assert tracking.get_alias("fashion-mnist", "champion") is None  # no model yet
    assert tracking.latest_version("fashion-mnist") is None

    tags = tracking.lineage_tags("md5-abc", "c0ffee", "dagster-run-1", "fashion-mnist-v1.0.0")
    with tracking.start_run("fashion-mnist", run_name="hpo", tags=tags) as parent:
        mlflow.log_param("search", "asha")
        for i in range(2):
            with tracking.start_run("fashion-mnist", run_name=f"trial-{i}", nested=True) as child:
                assert mlflow.active_run().info.run_id == child.info.run_id
                mlflow.log_param("lr", 0.1 * (i + 1))
                mlflow.log_metric("val_acc", 0.5 + i / 10)
        with tracking.start_run("fashion-mnist", run_name="by-id", parent_run_id=parent.info.run_id):
            pass
        model_info = mlflow.pyfunc.log_model(
            name="model", python_model=TextLength(), pip_requirements=["mlflow"]
        )
        assert mlflow.active_run().info.run_id == parent.info.run_id

    client = tracking.client
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "fashion-mnist"
    assert experiment.artifact_location == (home / "mlflow" / "artifacts" / "fashion-mnist").as_uri()
    assert tracking.experiment("fashion-mnist") == parent.info.experiment_id

    runs = {r.info.run_name: r for r in client.search_runs([parent.info.experiment_id])}
    assert set(runs) == {"hpo", "trial-0", "trial-1", "by-id"}
    for name in ("trial-0", "trial-1", "by-id"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[name].info.status == "FINISHED"
    assert runs["trial-1"].data.metrics["val_acc"] == pytest.approx(0.6)
    assert runs["hpo"].data.params["search"] == "asha"
    assert {k: runs["hpo"].data.tags[k] for k in DESIGN_TAGS} == tags
    assert tracking.run_url(parent.info.run_id, parent.info.experiment_id) == (
        f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    )

    v1 = tracking.register(model_info.model_uri, "fashion-mnist", tags)
    assert (v1.name, str(v1.version), v1.status) == (
        "local.fashion-mnist-classifier",
        "1",
        "READY",
    )  # sqlite: int, REST: str
    assert {k: v1.tags[k] for k in DESIGN_TAGS} == tags
    assert tracking.get_alias("fashion-mnist", "champion") is None  # model exists, alias does not

    tracking.set_alias("fashion-mnist", "champion", v1.version)
    v2 = tracking.register(f"runs:/{parent.info.run_id}/model", "fashion-mnist", {"note": "second"})
    assert str(v2.version) == "2"
    assert str(tracking.latest_version("fashion-mnist").version) == "2"
    champion = tracking.get_alias("fashion-mnist", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["dvc_data_version"] == "md5-abc"

    uri = tracking.model_uri("fashion-mnist", "champion")
    assert uri == "models:/local.fashion-mnist-classifier@champion"
    loaded = mlflow.pyfunc.load_model(uri)
    assert list(loaded.predict(pd.DataFrame({"text": ["ab", "abcd"]}))) == [2, 4]


def test_failing_block_marks_the_run_failed(ocm_home):
    tracking = LocalMlflow(home=str(ocm_home))
    with pytest.raises(ValueError, match="boom"):
        with tracking.start_run("failing", run_name="broken") as run:
            raise ValueError("boom")
    assert tracking.client.get_run(run.info.run_id).info.status == "FAILED"


def test_resource_in_a_dagster_run(ocm_home):
    @dg.asset
    def tracked(context: dg.AssetExecutionContext, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
        import mlflow

        tags = mlflow_tracking.lineage_tags("md5", "commit", context.run_id, None)
        with mlflow_tracking.start_run("dagster", run_name="asset", tags=tags) as run:
            mlflow.log_metric("x", 1.0)
        return dg.MaterializeResult(
            metadata={
                "run_id": run.info.run_id,
                "url": mlflow_tracking.run_url(run.info.run_id, run.info.experiment_id),
            }
        )

    resource = LocalMlflow(home=str(ocm_home), ui_url="http://127.0.0.1:5000")
    result = dg.materialize([tracked], resources={"mlflow_tracking": resource})
    assert result.success
    metadata = result.asset_materializations_for_node("tracked")[0].metadata
    run = resource.client.get_run(metadata["run_id"].value)
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert metadata["url"].value.endswith(f"/runs/{run.info.run_id}")


def test_unreachable_server_fails_fast_without_leaking_credentials():
    """It fails at its own /health probe (bounded by connect_timeout), before MLflow's client (which retries
    for minutes) is ever made."""
    port = closed_port()
    resource = RemoteMlflow(tracking_uri=f"http://ocm:s3cret@127.0.0.1:{port}", connect_timeout=3)
    with pytest.raises(MlflowUnavailableError) as err:
        resource.configure()
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "unreachable" in message and "timeout 3s" in message
    assert "s3cret" not in message
    assert resource._client is None


def test_server_that_is_not_mlflow_is_reported():
    with http_server(404) as url:
        with pytest.raises(MlflowUnavailableError, match="HTTP 404"):
            RemoteMlflow(tracking_uri=url, connect_timeout=3).configure()


AUTH_USER, AUTH_PASSWORD = "ocm-resource-user", "resource-password-789"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real `mlflow server` with MLflow's basic-auth app (tests/mlflow_server.py)."""
    from tests.mlflow_server import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), AUTH_USER, AUTH_PASSWORD) as server:
        yield server


@pytest.mark.slow
def test_remote_mlflow_against_a_basic_auth_server(auth_server):
    """The resource's credentials reach a real server: runs and a registered model with an alias; the
    server's own record names the user."""
    import mlflow

    tracking = RemoteMlflow(tracking_uri=auth_server.url, env_name="prod", tracking_username=AUTH_USER,
                            tracking_password=AUTH_PASSWORD)
    client = tracking.configure()
    assert client.tracking_uri == auth_server.url and mlflow.get_tracking_uri() == auth_server.url
    experiment = tracking.experiment("prod.fashion-mnist")
    with tracking.start_run("prod.fashion-mnist", run_name="auth", tags={"dvc_data_version": "v1"}) as run:
        mlflow.log_metric("val_accuracy", 0.75)
    name = tracking.model_name("fashion-mnist")
    assert name == "prod.fashion-mnist-classifier"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    stored = client.get_run(run.info.run_id)
    assert stored.info.experiment_id == experiment and stored.data.metrics["val_accuracy"] == 0.75
    assert stored.info.user_id == AUTH_USER
    assert client.get_model_version_by_alias(name, "champion").run_id == run.info.run_id
    assert "/api/2.0/mlflow/runs/create" in auth_server.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("password", ["wrong-password", None])
def test_remote_mlflow_with_a_wrong_or_no_password_is_refused(auth_server, password, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    tracking = RemoteMlflow(tracking_uri=auth_server.url, tracking_username=AUTH_USER if password else None,
                            tracking_password=password)
    tracking.configure()  # /health answers without credentials: the server is there
    with pytest.raises(MlflowException) as err:
        tracking.experiment("refused")
    assert "401" in str(err.value) or "Unauthorized" in str(err.value), err.value
    assert AUTH_PASSWORD not in str(err.value)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://u:p@host:5000/x", "http://***@host:5000/x"),
        ("https://token@host", "https://***@host"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_code_version_is_the_git_commit_of_the_checkout(tmp_path):
    import subprocess

    from ocm_resources.mlflow import LocalMlflow, git_code_version

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    version = git_code_version()
    assert version is not None and version.removesuffix("-dirty") == head
    tags = LocalMlflow(home=str(tmp_path)).lineage_tags("t", "c", "r", "p")
    assert tags["code_version"] == version
    # an image records it at build time (OCM_CODE_VERSION -> the resource field); outside git there is none
    assert LocalMlflow(home=str(tmp_path), code_version="abc123").lineage_tags("t", "c", "r", "p")[
        "code_version"] == "abc123"
    assert git_code_version(tmp_path) is None

"""OCM_ENV picks the resources and the executor: embedded ones for `local`, remote ones configured from the
environment for `cluster`, with every secret passed as a dg.EnvVar (a variable name, resolved in the step)."""

import os
import subprocess
import sys

import dagster as dg
import pytest
from dagster._config import process_config
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value
from dagster_k8s import k8s_job_executor

from ocm_resources.env import (
    CLUSTER_REQUIRED,
    SECRET_VARS,
    ConfigurationError,
    build_executor,
    build_resources,
    k8s_executor_config,
    local_ports,
    local_ray_environment,
    serve_host,
)
from ocm_resources.mlflow import LocalMlflow, RemoteMlflow
from ocm_resources.ray import RayHead
from ocm_resources.registry import DvcRegistry
from ocm_resources.serve_control import ServeControl
from ocm_resources.storage import CheckpointStorage
from tests.cluster.helpers import IDENTITIES, ROOT, SECRETS, set_env

CLUSTER = {
    "OCM_ENV": "cluster",
    "OCM_REGISTRY_URL": "https://git.example.com/data/registry.git",
    "OCM_DVC_REMOTE": "s3remote",
    "MLFLOW_TRACKING_URI": "http://mlflow.ocm.svc.cluster.local:5000",
    "OCM_CHECKPOINT_PATH": "s3://ocm-checkpoints/ray-results",
    "OCM_S3_ENDPOINT": "http://minio.ocm.svc.cluster.local:9000",
    "AWS_REGION": "eu-west-1",
    "RAY_ADDRESS": "ocm-training-head-svc.ocm.svc.cluster.local:6379",
    "OCM_SERVE_RAY_ADDRESS": "ocm-endpoints-head-svc.ocm.svc.cluster.local:6379",
    "OCM_IMAGE_TAG": "abc1234",
    **SECRETS,
    **IDENTITIES,
}
HEAVY = ("torch", "ray", "lightning", "transformers", "mlflow", "dvc", "pandera")
TRAIN_OPS = {"fashion_mnist__model", "tweet_sentiment__hpo", "tweet_sentiment__model"}


@pytest.fixture
def cluster_env(monkeypatch):
    set_env(monkeypatch, CLUSTER)
    return CLUSTER


def test_local_builds_the_embedded_stack(monkeypatch, tmp_path):
    set_env(monkeypatch, {"OCM_HOME": str(tmp_path)})
    r = build_resources("local")
    assert type(r["registry"]) is DvcRegistry and r["registry"].repo_url == str(tmp_path / "registry")
    assert r["registry"].remote is None
    ray = r["ray_cluster"]
    assert type(ray) is RayHead
    assert (ray.address, ray.temp_dir, ray.start_local_if_no_head) == ("auto", str(tmp_path / "ray"), True)
    assert type(r["mlflow"]) is LocalMlflow and r["mlflow"].env_name == "local"
    assert r["mlflow"].resolved_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    checkpoints = r["checkpoints"]
    assert checkpoints.base_path == str(tmp_path / "ray-results") and not checkpoints.is_s3
    assert checkpoints.filesystem() is None
    serve = r["serve"]
    assert (serve.address, serve.http_host, serve.http_port) == ("auto", "127.0.0.1", 8000)
    assert build_executor("local") is None


def test_cluster_builds_remote_resources_from_the_environment(cluster_env):
    r = build_resources("cluster")
    assert set(r) == {"registry", "ray_cluster", "mlflow", "checkpoints", "serve", "io_manager",
                      "prediction_logs", "alerts"}

    # step outputs on S3: OCM_IO_BUCKET unset, so the checkpoint bucket; keys only as EnvVar
    io = r["io_manager"]
    assert (io.bucket, io.prefix, io.endpoint_url, io.region) == (
        "ocm-checkpoints", "dagster/io", "http://minio.ocm.svc.cluster.local:9000", "eu-west-1")
    assert io.access_key_id == dg.EnvVar("AWS_ACCESS_KEY_ID")
    assert io.secret_access_key == dg.EnvVar("AWS_SECRET_ACCESS_KEY")

    registry = r["registry"]
    assert type(registry) is DvcRegistry and registry.repo_url == dg.EnvVar("OCM_REGISTRY_URL")
    assert registry.remote == "s3remote"

    ray = r["ray_cluster"]
    assert type(ray) is RayHead and ray.address == dg.EnvVar("RAY_ADDRESS") and ray.keep_alive

    mlflow = r["mlflow"]
    assert type(mlflow) is RemoteMlflow
    assert mlflow.tracking_uri == dg.EnvVar("MLFLOW_TRACKING_URI")
    assert (mlflow.env_name, mlflow.docker_image_tag) == ("prod", "abc1234")
    assert mlflow.tracking_token == dg.EnvVar("MLFLOW_TRACKING_TOKEN")
    assert mlflow.tracking_username == dg.EnvVar("MLFLOW_TRACKING_USERNAME")
    assert mlflow.tracking_password == dg.EnvVar("MLFLOW_TRACKING_PASSWORD")

    checkpoints = r["checkpoints"]
    assert type(checkpoints) is CheckpointStorage
    assert checkpoints.base_path == dg.EnvVar("OCM_CHECKPOINT_PATH")
    assert checkpoints.endpoint_override == "http://minio.ocm.svc.cluster.local:9000"
    assert checkpoints.region == "eu-west-1"
    assert checkpoints.access_key_id == dg.EnvVar("AWS_ACCESS_KEY_ID")
    assert checkpoints.secret_access_key == dg.EnvVar("AWS_SECRET_ACCESS_KEY")

    serve = r["serve"]
    assert type(serve) is ServeControl
    assert serve.address == "ocm-endpoints-head-svc.ocm.svc.cluster.local:6379"
    assert (serve.http_host, serve.http_port) == ("0.0.0.0", 8000)

    # EnvVar fields resolve when the resource is initialised (in the step), to the environment's values
    with dg.build_resources({"checkpoints": checkpoints}) as live:
        resolved = live.checkpoints
        assert resolved.base_path == "s3://ocm-checkpoints/ray-results" and resolved.is_s3
        assert resolved.secret_access_key == SECRETS["AWS_SECRET_ACCESS_KEY"]
        assert resolved.path_for("fashion_mnist", "fashion-mnist-v1.0.0", "run/1") == (
            "ocm-checkpoints/ray-results/fashion_mnist/fashion-mnist-v1.0.0/run_1"
        )
        fs = resolved.filesystem()
        assert type(fs).__name__ == "S3FileSystem" and fs.region == "eu-west-1"


@pytest.mark.parametrize(
    "kind, expected", [(None, "KubeRayInteractiveJob"), ("cluster", "KubeRayCluster")]
)
def test_cluster_without_ray_address_uses_kuberay(cluster_env, monkeypatch, kind, expected):
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("OCM_SERVE_RAY_ADDRESS")
    monkeypatch.setenv("OCM_IMAGE", "ghcr.io/ocm/ocm-code-location:abc1234")
    if kind:
        monkeypatch.setenv("OCM_KUBERAY_KIND", kind)
    r = build_resources("cluster")
    ray = r["ray_cluster"]
    assert type(ray).__name__ == expected
    assert ray.image == "ghcr.io/ocm/ocm-code-location:abc1234"
    spec = ray.ray_job if expected == "KubeRayInteractiveJob" else ray.ray_cluster
    assert spec.metadata["namespace"] == "ocm"
    assert r["serve"].address == "auto"  # no long-lived cluster named: Serve refuses rather than guess


@pytest.mark.parametrize(
    "missing",
    [("OCM_REGISTRY_URL",), ("MLFLOW_TRACKING_URI",), ("OCM_CHECKPOINT_PATH",), CLUSTER_REQUIRED],
)
def test_cluster_without_required_variables_names_them(cluster_env, monkeypatch, missing):
    for name in missing:
        monkeypatch.delenv(name)
    with pytest.raises(ConfigurationError) as info:
        build_resources("cluster")
    message = str(info.value)
    for name in CLUSTER_REQUIRED:
        assert (name in message) == (name in missing), message
    assert "The cluster path" in message


def test_unknown_environment_is_refused(monkeypatch):
    monkeypatch.setenv("OCM_ENV", "staging")
    with pytest.raises(ConfigurationError, match="OCM_ENV='staging'"):
        build_resources()


def test_secrets_reach_resources_only_as_env_var_names(cluster_env):
    r = build_resources("cluster")
    env_var_fields = {}
    for key, resource in r.items():
        dumped = repr(resource) + repr(resource.model_dump())
        for name, value in SECRETS.items():
            assert value not in dumped, f"{name}'s value is stored in resource {key!r}"
        for field in type(resource).model_fields:
            value = getattr(resource, field)
            if isinstance(value, dg.EnvVar):
                env_var_fields[f"{key}.{field}"] = value.env_var_name
    # every credential variable that is set is wired in, through dg.EnvVar
    assert set(SECRET_VARS) | set(IDENTITIES) <= set(env_var_fields.values()), env_var_fields
    assert set(SECRET_VARS) == set(SECRETS)

    # what the code location serves to the webserver/daemon (the repository snapshot) holds no secret
    from ocm_assets.build import build_definitions

    defs = build_definitions(resources=r)
    snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
    assert "AWS_SECRET_ACCESS_KEY" in snapshot  # the variable's name is shown ...
    for name, value in SECRETS.items():
        assert value not in snapshot, f"{name}'s value is in the repository snapshot"  # ... never its value


def test_cluster_selects_the_k8s_executor_with_per_step_requests(cluster_env, monkeypatch):
    from ocm_assets.build import build_definitions

    monkeypatch.setenv("OCM_TRAIN_GPUS", "1")
    defs = build_definitions(resources=build_resources("cluster"))
    assert defs.executor.name == "k8s"
    assert defs.resolve_job_def("fashion_mnist_retrain").executor_def.name == "k8s"

    ops = {node.name for job in ("fashion_mnist_retrain", "tweet_sentiment_retrain")
           for node in defs.resolve_job_def(job).nodes_in_topological_order}
    assert TRAIN_OPS <= ops
    config = k8s_executor_config(sorted(TRAIN_OPS), sorted(ops - TRAIN_OPS))
    assert process_config(k8s_job_executor.config_schema.config_type, config).success
    for op, step in config["per_step_k8s_config"].items():
        limits = step["container_config"]["resources"]["limits"]
        if op in TRAIN_OPS:
            assert limits == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
            assert step["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert limits == {"cpu": "500m", "memory": "2Gi"} and "tolerations" not in step["pod_spec_config"]
        # every step pod: no root, no privilege escalation, no capabilities
        security = step["container_config"]["security_context"]
        assert security["run_as_non_root"] and security["allow_privilege_escalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert step["pod_spec_config"]["security_context"]["run_as_user"] == 1000

    monkeypatch.setenv("OCM_TRAIN_GPUS", "0")
    cpu_only = k8s_executor_config(sorted(TRAIN_OPS), [])
    assert all("nvidia.com/gpu" not in s["container_config"]["resources"]["limits"]
               for s in cpu_only["per_step_k8s_config"].values())


@pytest.mark.parametrize("choice, name", [("multiprocess", "multiprocess"), ("in_process", "in_process")])
def test_executor_can_be_overridden(cluster_env, monkeypatch, choice, name):
    monkeypatch.setenv("OCM_EXECUTOR", choice)
    assert build_executor("cluster").name == name


def test_bad_executor_settings_are_refused(cluster_env, monkeypatch):
    monkeypatch.setenv("OCM_EXECUTOR", "celery")
    with pytest.raises(ConfigurationError, match="OCM_EXECUTOR='celery'"):
        build_executor("cluster")
    monkeypatch.setenv("OCM_EXECUTOR", "k8s")
    monkeypatch.setenv("OCM_TRAIN_GPUS", "one")
    with pytest.raises(ConfigurationError, match="OCM_TRAIN_GPUS"):
        build_executor("cluster", train_ops=["fashion_mnist__model"])


def test_cluster_code_location_loads_without_heavy_modules(cluster_env):
    code = (
        "import sys, ocm_assets.definitions as d; "
        f"print('heavy=' + ','.join(m for m in {HEAVY!r} if m in sys.modules)); "
        "print('loaded=' + type(d.defs.resources['ray_cluster']).__name__, d.defs.executor.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert lines["heavy"] == "", f"heavy modules imported at load: {lines['heavy']}"
    assert lines["loaded"] == "RayHead k8s"


@pytest.mark.parametrize(
    ("env", "call", "message"),
    [
        ({"OCM_SERVE_PORT": "eight"}, lambda: build_resources("local"),
         "OCM_SERVE_PORT='eight' is not a TCP port"),
        ({"OCM_DAGSTER_PORT": "70000"}, local_ports, "OCM_DAGSTER_PORT='70000' is out of range"),
        ({"OCM_MLFLOW_PORT": "3000"}, local_ports, "OCM_MLFLOW_PORT and OCM_DAGSTER_PORT are both 3000"),
        ({**CLUSTER, "OCM_SERVE_PORT": "x"}, lambda: build_resources("cluster"), "OCM_SERVE_PORT='x'"),
        ({**CLUSTER, "RAY_ADDRESS": "", "OCM_RAY_MAX_WORKERS": "two"}, lambda: build_resources("cluster"),
         "OCM_RAY_MAX_WORKERS='two' is not a number of Ray workers"),
        ({"OCM_TRAIN_GPUS": "1.5"}, lambda: k8s_executor_config([], []),
         "OCM_TRAIN_GPUS='1.5' is not a whole"),
        ({"OCM_MAX_CONCURRENT_STEPS": "many"}, lambda: k8s_executor_config([], []),
         "OCM_MAX_CONCURRENT_STEPS='many' is not a whole number of step pods"),
        ({"RAY_AUTH_MODE": "disabled"}, local_ray_environment, "RAY_AUTH_MODE='disabled'"),
    ],
)
def test_bad_environment_values_name_the_variable(monkeypatch, env, call, message):
    set_env(monkeypatch, env)
    with pytest.raises(ConfigurationError) as err:
        call()
    assert message in str(err.value)


def test_local_ports_bind_host_and_ray_settings(monkeypatch):
    set_env(monkeypatch, {"OCM_SERVE_PORT": "18000", "OCM_MLFLOW_PORT": " 15000 "})
    ports = local_ports()
    assert (ports.serve, ports.mlflow, ports.ray, ports.dagster) == (18000, 15000, 6379, 3000)
    r = build_resources("local")
    assert (r["serve"].http_host, r["serve"].http_port) == ("127.0.0.1", 18000)
    assert r["mlflow"].ui_url == "http://127.0.0.1:15000"
    assert serve_host("local") == "127.0.0.1"
    set_env(monkeypatch, CLUSTER)
    assert serve_host("cluster") == "0.0.0.0"  # pods keep their own binding
    env = local_ray_environment()
    assert {k: env[k] for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")} == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    # Serve's ingress on the heads ocm starts: HAProxy on the contract port, kept on loopback by the wrapper
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith(
        "scripts/haproxy-loopback")
    assert 0 < int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]) < 65536


def test_a_fallback_proxy_port_set_in_the_environment_is_kept(monkeypatch):
    """A process that already ran single_node_ray has the fallback proxy's ports in os.environ: the next
    environment keeps them (and names them), it does not drop them nor pick new ones."""
    monkeypatch.setenv("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "18500")
    monkeypatch.delenv("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", raising=False)
    env = local_ray_environment()
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "18500"
    assert 0 < int(env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"]) < 65536


def test_shell_env_for_dev_sh_and_a_clear_error_without_traceback():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCM_")}
    ok = subprocess.run([sys.executable, "-m", "ocm_resources.env", "shell-env"], cwd=ROOT,
                        env={**env, "OCM_RAY_PORT": "16379"}, capture_output=True, text=True, check=True)
    assert "export OCM_RAY_PORT=16379" in ok.stdout and "export OCM_BIND_HOST=127.0.0.1" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ocm_resources.env", "shell-env"], cwd=ROOT,
                         env={**env, "OCM_RAY_PORT": "637a"}, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "!! OCM_RAY_PORT='637a' is not a TCP port number"


def test_cluster_needs_a_bucket_for_step_outputs(cluster_env, monkeypatch):
    monkeypatch.setenv("OCM_CHECKPOINT_PATH", "/data/ray-results")
    with pytest.raises(ConfigurationError, match="OCM_IO_BUCKET"):
        build_resources("cluster")
    monkeypatch.setenv("OCM_IO_BUCKET", "io-bucket")
    monkeypatch.setenv("OCM_IO_PREFIX", "/runs/")
    io = build_resources("cluster")["io_manager"]
    assert (io.bucket, io.prefix) == ("io-bucket", "/runs/")
    monkeypatch.delenv("OCM_IO_BUCKET")
    monkeypatch.setenv("OCM_EXECUTOR", "in_process")  # one process: Dagster's filesystem IO manager works
    assert "io_manager" not in build_resources("cluster")

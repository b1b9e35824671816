"""deploy/, dagster_cloud.yaml and workspace.yaml: they parse, and they agree with each other and with the
code on the image, the module, the ports, the Ray version, the Serve applications and the settings."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from ocm_assets.families import FAMILIES, family
from tests.cluster.helpers import (
    DEPLOY,
    IMAGE_REPOSITORY,
    MODULE,
    ROOT,
    SECRETS,
    load_docs,
    lock_versions,
    manifests,
    set_env,
    walk,
)

HELM_VALUES = DEPLOY / "helm" / "dagster-values.yaml"
PORTS = {"dagster": 3000, "grpc": 3030, "serve": 8000, "dashboard": 8265, "gcs": 6379, "client": 10001,
         "mlflow": 5000, "minio": 9000}


@pytest.fixture(scope="module")
def objects():
    return manifests()


@pytest.fixture(scope="module")
def values():
    (doc,) = load_docs(HELM_VALUES)
    return doc


@pytest.fixture(scope="module")
def config(objects):
    return objects[("ConfigMap", "ocm-config")]["data"]


def containers(obj):
    return [c for group in walk(obj, "containers") for c in group]


def pod_specs(obj):
    """Every pod spec in a manifest: the parents of its `containers` lists."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.append(node)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(obj)
    return found


def rendered_serve_config(text: str, versions: dict[str, str]) -> str:
    """`envsubst '$A $B'` of the RayService's serveConfigV2: only the named variables, all of them set."""
    def fill(match):
        assert match.group(1) in versions, f"${{{match.group(1)}}} is not a documented placeholder"
        return versions[match.group(1)]

    return re.sub(r"\$\{([A-Z_]+)\}", fill, text)


def env_of(container):
    """{name: value or valueFrom} of a container's env."""
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in container.get("env", [])}


def ports_of(container):
    return {p["containerPort"]: p.get("name") for p in container.get("ports", [])}


def ocm_image_tag(values):
    return values["dagster-user-deployments"]["deployments"][0]["image"]["tag"]


def test_every_file_parses_into_kubernetes_objects(objects):
    files = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml"))
    assert {"helm/dagster-values.yaml", "kuberay/raycluster-training.yaml",
            "kuberay/rayservice-endpoints.yaml", "minio.yaml", "mlflow.yaml", "ocm-config.yaml"} <= set(files)
    kinds = {kind for kind, _ in objects}
    assert {"RayCluster", "RayService", "ConfigMap", "Deployment", "Service", "Namespace"} <= kinds
    for (kind, name), obj in objects.items():
        assert obj["apiVersion"] and re.fullmatch(r"[a-z0-9-]+", name), (kind, name)
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "ocm", (kind, name)


def test_images_are_ours_and_pinned(objects, values, config):
    tag = ocm_image_tag(values)
    ours = f"{IMAGE_REPOSITORY}:{tag}"
    assert config["OCM_IMAGE"] == ours and config["OCM_IMAGE_TAG"] == tag
    images = {c["image"] for obj in objects.values() for c in containers(obj)}
    for image in images:
        repository, _, version = image.rpartition(":")
        assert repository and version and version != "latest", f"{image}: pin the image's version"
        if "ocm" in repository:
            assert image == ours, f"{image}: every ocm pod runs the code-location image {ours}"
    ray_pods = containers(objects[("RayCluster", "ocm-training")]) + containers(
        objects[("RayService", "ocm-endpoints")])
    assert ray_pods and {c["image"] for c in ray_pods} == {ours}
    assert {c["image"] for c in containers(objects[("Deployment", "mlflow")])} == {ours}


def test_dagster_helm_values(values):
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert values["dagster-user-deployments"]["enabled"] is True
    assert deployment["name"] == "ocm"
    assert deployment["image"]["repository"] == IMAGE_REPOSITORY
    assert deployment["dagsterApiGrpcArgs"] == ["-m", MODULE]
    assert importlib.util.find_spec(MODULE) is not None
    assert deployment["port"] == PORTS["grpc"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert {"name": "OCM_ENV", "value": "cluster"} in deployment["env"]
    assert deployment["envConfigMaps"] == [{"name": "ocm-config"}]
    assert {s["name"] for s in deployment["envSecrets"]} == {"ocm-s3", "ocm-mlflow", "ocm-ray-auth"}
    assert not any(s.get("optional") for s in deployment["envSecrets"])  # MLflow and Ray need their logins
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    assert launcher["config"]["k8sRunLauncher"]["envConfigMaps"] == deployment["envConfigMaps"]
    assert launcher["config"]["k8sRunLauncher"]["envSecrets"] == deployment["envSecrets"]
    assert values["postgresql"]["enabled"] is True and values["postgresql"]["service"]["port"] == 5432
    assert "postgresqlPassword" not in values["postgresql"]  # set with --set at install, never committed
    assert values["dagsterWebserver"]["service"]["port"] == PORTS["dagster"]
    assert values["dagsterDaemon"]["enabled"] is True


def test_image_tag_matches_the_package_version(values):
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ocm_image_tag(values) == version


def test_raycluster_for_training(objects, config):
    cluster = objects[("RayCluster", "ocm-training")]
    spec = cluster["spec"]
    assert spec["rayVersion"] == lock_versions()["ray"]
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert ports_of(head) == {PORTS["gcs"]: "gcs-server", PORTS["dashboard"]: "dashboard",
                              PORTS["client"]: "client"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (gpu,) = groups["gpu"]["template"]["spec"]["containers"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the code location trains on this cluster through Ray Client: its step pods run no raylet
    assert config["RAY_ADDRESS"] == f"ray://ocm-training-head-svc.ocm.svc.cluster.local:{PORTS['client']}"
    for container in containers(cluster):
        assert {"secretRef": {"name": "ocm-s3"}} in container["envFrom"]


def test_rayservice_serves_both_families_with_importable_builders(objects, config):
    from ray import serve

    service = objects[("RayService", "ocm-endpoints")]
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == lock_versions()["ray"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == PORTS["serve"]
    apps = {app["name"]: app for app in serve_config["applications"]}
    assert set(apps) == {fam.name for fam in FAMILIES} == {"fashion_mnist", "tweet_sentiment"}
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert ports_of(head) == {PORTS["gcs"]: "gcs-server", PORTS["dashboard"]: "dashboard",
                              PORTS["client"]: "client", PORTS["serve"]: "serve"}
    assert config["OCM_SERVE_RAY_ADDRESS"] == (
        f"ray://ocm-endpoints-head-svc.ocm.svc.cluster.local:{PORTS['client']}")
    assert config["OCM_SERVE_PORT"] == str(PORTS["serve"])
    # step pods call Serve through the RayService's Serve Service (KubeRay names it <name>-serve-svc)
    assert config["OCM_SERVE_HOST"] == "ocm-endpoints-serve-svc.ocm.svc.cluster.local"
    assert "@" not in service["spec"]["serveConfigV2"], "serve pinned versions, never an alias"
    pinned = {}

    for fam in FAMILIES:
        app = apps[fam.name]
        assert app["route_prefix"] == f"/{fam.name}"
        args = app["args"]
        assert args["kind"] == fam.kind
        # a pinned version, filled by the deploy step (envsubst) with the version `champion` names then
        variable = f"{fam.name.upper()}_MODEL_VERSION"
        assert args["model_uri"] == (
            f"models:/{config['OCM_MLFLOW_ENV']}.{fam.dataset}-classifier/${{{variable}}}")
        pinned[variable] = "7"
        assert args["tracking_uri"] == config["MLFLOW_TRACKING_URI"]
        assert args["registry_url"] == config["OCM_REGISTRY_URL"]
    # what `envsubst` gives KubeRay; then Serve builds each application from import_path + args
    rendered = yaml.safe_load(rendered_serve_config(service["spec"]["serveConfigV2"], pinned))
    for app in rendered["applications"]:
        fam = family(app["name"])
        args = app["args"]
        assert args["model_uri"] == f"models:/{config['OCM_MLFLOW_ENV']}.{fam.dataset}-classifier/7"
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        application = builder(dict(args))  # what Serve does with import_path + args
        assert isinstance(application, serve.Application)
        deployment = application._bound_deployment
        assert deployment.name == {"image": "ImageClassifier", "text": "TextClassifier"}[fam.kind]
        user_config = deployment.user_config
        assert user_config["model_uri"] == args["model_uri"] and "num_replicas" not in user_config
        assert deployment.num_replicas == args["num_replicas"]
        assert deployment.max_ongoing_requests == args["max_ongoing_requests"]


def test_entrypoint_refuses_the_wrong_kind():
    from ocm_ml.serve.entrypoints import image_app

    with pytest.raises(ValueError, match="kind='image'"):
        image_app({"kind": "text"})


def test_mlflow_and_minio_services(objects, config):
    mlflow_service = objects[("Service", "mlflow")]
    assert [p["port"] for p in mlflow_service["spec"]["ports"]] == [PORTS["mlflow"]]
    assert config["MLFLOW_TRACKING_URI"] == f"http://mlflow.ocm.svc.cluster.local:{PORTS['mlflow']}"
    (server,) = containers(objects[("Deployment", "mlflow")])
    args = server["command"] + server["args"]
    assert args[:2] == ["mlflow", "server"] and f"--port={PORTS['mlflow']}" in args
    assert "--artifacts-destination=s3://ocm-mlflow/artifacts" in args
    # the database password is never in argv: libpq reads PGPASSWORD (from the Secret)
    assert ("--backend-store-uri=postgresql://mlflow@mlflow-postgresql.ocm.svc.cluster.local:5432/mlflow"
            in args)
    assert not any("PASSWORD" in a for a in args)
    assert env_of(server)["PGPASSWORD"] == {
        "secretKeyRef": {"name": "ocm-mlflow-db", "key": "POSTGRES_PASSWORD"}}
    (postgres,) = containers(objects[("Deployment", "mlflow-postgresql")])
    assert "args" not in postgres and "command" not in postgres
    assert env_of(postgres)["POSTGRES_PASSWORD"] == env_of(server)["PGPASSWORD"]
    assert ports_of(server) == {PORTS["mlflow"]: "http"}

    minio = objects[("Service", "minio")]
    assert PORTS["minio"] in [p["port"] for p in minio["spec"]["ports"]]
    assert config["OCM_S3_ENDPOINT"] == f"http://minio.ocm.svc.cluster.local:{PORTS['minio']}"
    buckets = " ".join(containers(objects[("Job", "minio-buckets")])[0]["args"])
    for bucket in ("ocm-checkpoints", "ocm-dvc", "ocm-mlflow"):
        assert f"ocm/{bucket}" in buckets
    assert config["OCM_CHECKPOINT_PATH"].startswith("s3://ocm-checkpoints/")


def test_config_map_builds_the_cluster_resources(monkeypatch, config):
    from ocm_resources.env import CLUSTER_REQUIRED, SECRET_VARS, build_resources

    assert config["OCM_ENV"] == "cluster"
    assert set(CLUSTER_REQUIRED) <= set(config)
    assert not set(SECRET_VARS) & set(config), "secrets belong in Secrets, not in the ConfigMap"
    set_env(monkeypatch, dict(config))
    resources = build_resources()  # OCM_ENV from the ConfigMap
    assert type(resources["ray_cluster"]).__name__ == "RayHead"
    assert type(resources["mlflow"]).__name__ == "RemoteMlflow"
    assert resources["registry"].remote == config["OCM_DVC_REMOTE"] == "s3remote"
    # step pods hand outputs over through S3 (the bucket deploy/minio.yaml creates)
    io = resources["io_manager"]
    assert type(io).__name__ == "S3IOManager"
    assert (io.bucket, io.prefix, io.endpoint_url) == ("ocm-dagster-io", "dagster/io",
                                                       config["OCM_S3_ENDPOINT"])
    buckets = " ".join(containers(manifests()[("Job", "minio-buckets")])[0]["args"])
    assert f"ocm/{io.bucket}" in buckets


def test_no_secret_values_are_committed():
    texts = [p.read_text() for p in DEPLOY.rglob("*.yaml")]
    texts += [(ROOT / name).read_text() for name in ("dagster_cloud.yaml", "workspace.yaml", "Dockerfile")]
    for text in texts:
        for value in SECRETS.values():
            assert value not in text
        assert not re.search(r"(?i)(password|secret_access_key|token)\s*[:=]\s*[\"']?[A-Za-z0-9/+]{8,}", text)
        assert "kind: Secret" not in text  # Secrets are created with kubectl (README), not committed


def test_dagster_cloud_yaml_is_valid_and_points_at_the_module():
    from dagster_cloud_cli.commands.ci.checks import check_dagster_cloud_yaml
    from dagster_cloud_cli.config.models import load_dagster_cloud_yaml
    from dagster_k8s.container_context import K8sContainerContext

    path = ROOT / "dagster_cloud.yaml"
    result = check_dagster_cloud_yaml(path)
    assert result.errors == []
    (location,) = load_dagster_cloud_yaml(path.read_text()).locations
    assert location.location_name == "ocm"
    assert location.code_source.module_name == MODULE
    assert location.build.registry == IMAGE_REPOSITORY
    assert (ROOT / location.build.directory / "Dockerfile").is_file()
    context = K8sContainerContext.create_from_config(location.container_context)  # raises when invalid
    run_container = context.run_k8s_config.container_config  # what run and step pods get
    assert run_container["env_from"] == [
        {"config_map_ref": {"name": "ocm-config"}},
        {"secret_ref": {"name": "ocm-s3"}},
        {"secret_ref": {"name": "ocm-mlflow"}},
        {"secret_ref": {"name": "ocm-ray-auth"}},
    ]
    assert {"name": "OCM_ENV", "value": "cluster"} in run_container["env"]
    assert context.namespace == "ocm"


def test_workspace_yaml_is_valid_and_points_at_the_module():
    from dagster._core.workspace.config_schema import ensure_workspace_config

    path = ROOT / "workspace.yaml"
    workspace = yaml.safe_load(path.read_text())
    ensure_workspace_config(workspace, str(path))  # raises on an invalid workspace
    (entry,) = workspace["load_from"]
    assert entry["python_module"]["module_name"] == MODULE
    assert entry["python_module"]["location_name"] == "ocm"
    assert Path(ROOT / entry["python_module"]["working_directory"]).resolve() == ROOT


# -- security and reachability properties of every manifest --------------------------------------------------

def helm_containers(values):
    """(where, container-like settings) of every container the Dagster Helm values configure."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    run = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]
    return [("webserver", values["dagsterWebserver"]), ("daemon", values["dagsterDaemon"]),
            ("user deployment", deployment), ("run pods", run)]


def check_security_context(where, security, read_only=True):
    assert security, f"{where}: no securityContext"
    assert security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
    assert security.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
    assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL capabilities"
    if read_only:
        assert security.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"


def check_resources(where, resources):
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    assert {"cpu", "memory"} <= set(requests), f"{where}: cpu and memory requests"
    assert {"cpu", "memory"} <= set(limits), f"{where}: cpu and memory limits"


def test_every_container_has_limits_and_a_security_context(objects, values):
    seen = 0
    for (kind, name), obj in objects.items():
        for pod in pod_specs(obj):
            for container in pod["containers"]:
                where = f"{kind}/{name}/{container['name']}"
                check_security_context(where, container.get("securityContext"))
                check_resources(where, container.get("resources", {}))
                seen += 1
                # a read-only root filesystem needs somewhere to write: /tmp is a volume
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: /tmp volume"
            assert pod.get("securityContext", {}).get("runAsUser"), f"{kind}/{name}: pod runAsUser"
    assert seen >= 9
    for kind, name in (("RayCluster", "ocm-training"), ("RayService", "ocm-endpoints")):
        autoscaler = next(walk(objects[(kind, name)], "autoscalerOptions"))
        check_security_context(f"{kind}/{name} autoscaler", autoscaler["securityContext"])
        check_resources(f"{kind}/{name} autoscaler", autoscaler["resources"])
    for where, settings in helm_containers(values):
        # Dagster pods write under DAGSTER_HOME and /tmp of the image
        check_security_context(f"helm {where}", settings.get("securityContext"), read_only=False)
        check_resources(f"helm {where}", settings.get("resources", {}))
    assert values["postgresql"]["resources"]["limits"]["memory"]


def test_ray_addresses_are_ray_client_urls(objects, config):
    # pods that run no raylet reach Ray only through Ray Client (ray://host:10001), never the GCS port
    addresses = {k: v for k, v in config.items() if k.endswith("RAY_ADDRESS")}
    assert set(addresses) == {"RAY_ADDRESS", "OCM_SERVE_RAY_ADDRESS"}
    for name, address in addresses.items():
        assert address.startswith("ray://") and address.endswith(f":{PORTS['client']}"), (name, address)
    for obj in objects.values():
        for container in containers(obj):
            address = env_of(container).get("RAY_ADDRESS")
            assert address is None or str(address).startswith("ray://"), container["name"]


def client_urls(node, path=""):
    """(path, value) of every string in a tree that a client would call: URLs and *_URI/*_URL/*_HOST
    values."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from client_urls(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from client_urls(item, f"{path}[{i}]")
    elif isinstance(node, str) and not path.endswith(".serveConfigV2"):  # parsed on its own
        if "://" in node or re.search(r"(_URI|_URL|_HOST|_ENDPOINT|_ADDRESS)$", path.split(".")[-1]):
            yield path, node


def test_no_wildcard_or_loopback_address_is_used_to_call_anything(objects, config):
    found = []
    for (kind, name), obj in objects.items():
        found += [(f"{kind}/{name}{p}", v) for p, v in client_urls(obj)]
    for app in yaml.safe_load(
        objects[("RayService", "ocm-endpoints")]["spec"]["serveConfigV2"]
    )["applications"]:
        found += [(f"serveConfigV2 {app['name']}{p}", v) for p, v in client_urls(app["args"])]
    assert len(found) > 20
    for where, value in found:
        assert not re.search(r"(0\.0\.0\.0|127\.0\.0\.1|localhost|\[::\])", value), (where, value)
    # service addresses are Service DNS names in the namespace
    for name in ("MLFLOW_TRACKING_URI", "OCM_S3_ENDPOINT", "OCM_SERVE_HOST", "RAY_ADDRESS",
                 "OCM_SERVE_RAY_ADDRESS"):
        assert ".ocm.svc.cluster.local" in config[name], name


def test_ray_token_auth_on_both_clusters(objects, config):
    token = {"secretKeyRef": {"name": "ocm-ray-auth", "key": "RAY_AUTH_TOKEN"}}
    for key in (("RayCluster", "ocm-training"), ("RayService", "ocm-endpoints")):
        ray_containers = containers(objects[key]) + [next(walk(objects[key], "autoscalerOptions"))]
        for container in ray_containers:
            env = env_of(container)
            assert env.get("RAY_AUTH_MODE") == "token", (key, container.get("name", "autoscaler"))
            assert env.get("RAY_AUTH_TOKEN") == token, (key, container.get("name", "autoscaler"))
    # the ocm pods (ConfigMap + Secret ocm-ray-auth) authenticate with the same token
    assert config["RAY_AUTH_MODE"] == "token" and config["OCM_RAY_AUTH_SECRET"] == "ocm-ray-auth"
    assert "RAY_AUTH_TOKEN" not in config


def test_mlflow_server_requires_basic_auth_and_ocm_pods_log_in(objects, values):
    import configparser

    (server,) = containers(objects[("Deployment", "mlflow")])
    assert "--app-name=basic-auth" in server["args"]
    assert {"secretRef": {"name": "ocm-mlflow-admin"}} in server["envFrom"]
    ini = configparser.ConfigParser()
    ini.read_string(objects[("ConfigMap", "mlflow-auth")]["data"]["basic_auth.ini"])
    assert env_of(server)["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow-auth/basic_auth.ini"
    assert ini["mlflow"]["default_permission"] == "READ"
    assert "admin_password" not in ini["mlflow"]  # MLFLOW_AUTH_ADMIN_PASSWORD from the Secret
    assert ini["mlflow"]["database_uri"].startswith("postgresql://mlflow@")  # PGPASSWORD, not in the URI
    # every ocm pod and every Serve replica has the Secret with MLFLOW_TRACKING_USERNAME/PASSWORD
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert {"name": "ocm-mlflow"} in deployment["envSecrets"]
    assert {"name": "ocm-mlflow"} in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    for container in containers(objects[("RayService", "ocm-endpoints")]):
        assert {"secretRef": {"name": "ocm-mlflow"}} in container["envFrom"]


def test_no_secret_is_a_literal_or_an_argument(objects):
    for (kind, name), obj in objects.items():
        for container in containers(obj):
            for item in container.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|KEY_ID", item["name"]):
                    assert "valueFrom" in item, f"{kind}/{name}: {item['name']} must come from a Secret"
            argv = " ".join(container.get("command", []) + container.get("args", []))
            assert not re.search(r"\$\(?[A-Z_]*(PASSWORD|SECRET|TOKEN)", argv), (
                f"{kind}/{name}: secret in argv")

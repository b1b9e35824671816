"""champion + endpoint assets against a real local Serve over HTTP: the first model is promoted and deployed,
a better one hot-reloads the endpoint, a worse one is refused and the endpoint keeps serving the champion.

The family is declared here (`fashion_mnist_e2e`, an image family): the asset factories are configuration."""

import json
import urllib.request

import dagster as dg
import pytest

from ocm_assets.families import Family
from ocm_assets.serving import build_serving_assets, champion_key, endpoint_key
from ocm_assets.training import model_key
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.serve_control import ServeControl
from tests.registry_helpers import image_version, new_registry

FAM = Family("fashion_mnist_e2e", "fashion-mnist", "image", "test family")


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory, serve_http):
    root = tmp_path_factory.mktemp("serving-assets")
    pub, reg = new_registry(root)
    tags = [pub.publish("fashion-mnist", v, *image_version(n_train=40, n_val=20, seed=i)).tag
            for i, v in enumerate(["1.0.0", "1.1.0", "1.2.0"])]
    port = int(serve_http.rsplit(":", 1)[1])
    mlflow = LocalMlflow(home=str(root), env_name="e2e")
    resources = {"mlflow": mlflow, "registry": reg, "serve": ServeControl(address=None, http_port=port)}
    import mlflow as ml
    from ray import serve

    tracking = ml.get_tracking_uri()
    yield tags, mlflow, resources, f"{serve_http}/{FAM.name}"
    serve.delete(FAM.name)
    ml.set_tracking_uri(tracking)
    ml.set_registry_uri(None)  # unset again: later tests register into their own tracking store
    __import__('os').environ.pop('MLFLOW_REGISTRY_URI', None)


def register(mlflow, tag: str, accuracy: float, seed: int) -> str:
    import mlflow as ml
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    with mlflow.start_run("e2e.fashion-mnist", run_name=f"fake train {tag}",
                          tags=mlflow.lineage_tags(tag, "c0ffee", "dagster-run", tag)):
        ml.log_metric("val_accuracy", accuracy)
        info = ml.pytorch.log_model(net, name="model", serialization_format="pickle")
    return mlflow.register(info.model_uri, "fashion-mnist", tags={"data_version": tag}).version


def rollout(resources, endpoint_config=None):
    assets = [
        dg.SourceAsset(model_key(FAM)),
        *build_serving_assets(FAM),
    ]
    run_config = {"ops": {f"{FAM.name}__endpoint": {"config": endpoint_config}}} if endpoint_config else None
    return dg.materialize(assets, resources=resources, raise_on_error=False, run_config=run_config,
                          selection=[champion_key(FAM), endpoint_key(FAM)])


def checks(result):
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_promote_deploy_reload_and_refuse(stack):
    tags, mlflow, resources, url = stack
    v1 = register(mlflow, tags[0], 0.80, seed=1)
    result = rollout(resources)
    assert result.success, checks(result)
    assert checks(result) == {"promoted": True, "health": True, "known_answer": True}
    info = _get(f"{url}/info")
    assert info["model_uri"].endswith(f"/{v1}") and info["data_version"] == tags[0]
    assert _get(f"{url}/health")["status"] == "healthy"
    endpoint = next(e.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key == endpoint_key(FAM))
    assert endpoint.metadata["action"].value == "deployed"

    v2 = register(mlflow, tags[1], 0.85, seed=2)
    result = rollout(resources)
    assert result.success and checks(result)["known_answer"]
    endpoint = next(e.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key == endpoint_key(FAM))
    assert endpoint.metadata["action"].value == "reconfigured"
    info = _get(f"{url}/info")
    assert info["model_uri"].endswith(f"/{v2}") and info["data_version"] == tags[1]
    assert mlflow.get_alias("fashion-mnist", "champion").version == v2

    # worse by less than the margin: refused, the blocking check stops the endpoint from changing
    register(mlflow, tags[2], 0.855, seed=3)
    result = rollout(resources)
    assert not result.success and checks(result) == {"promoted": False}
    assert endpoint_key(FAM) not in {e.asset_key for e in result.get_asset_materialization_events()}
    champion = next(e.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key == champion_key(FAM))
    assert champion.metadata["decision"].value == "kept"
    assert "does not beat" in champion.metadata["reasons"].value
    assert mlflow.get_alias("fashion-mnist", "champion").version == v2
    assert _get(f"{url}/info")["model_uri"].endswith(f"/{v2}")


def test_endpoint_without_long_lived_cluster_says_what_to_do(tmp_path):
    from ocm_resources.serve_control import ServeError

    control = ServeControl(address="auto", temp_dir=str(tmp_path / "no-head"))
    with pytest.raises(ServeError, match="make dev"):
        control.connect()


FAST_CANARY = {"rollout": "canary", "canary_steps": [0.25, 1.0], "canary_step_seconds": 0.5,
               "canary_min_requests": 5, "canary_max_p99_ms": 5000.0, "rollout_timeout_seconds": 60.0}


def endpoint_failure(result) -> str:
    return next(e for e in result.all_events
                if e.is_step_failure and e.step_key.endswith("endpoint")).step_failure_data.error.to_string()


def test_canary_rolls_back_on_a_broken_threshold_then_steps_through(stack):
    """Canary of a promoted challenger: a broken threshold rolls the endpoint and the alias back; within the
    thresholds it steps 25 % -> 100 % (probe traffic, nobody else calling) and switches."""
    tags, mlflow, resources, url = stack
    served = _get(f"{url}/info")["model_uri"]
    served_version = served.rsplit("/", 1)[1]

    bad = register(mlflow, tags[2], 0.90, seed=4)
    result = rollout(resources, {**FAST_CANARY, "canary_max_p99_ms": 0.001})  # no model answers that fast
    assert not result.success and checks(result)["promoted"]
    text = endpoint_failure(result)
    assert "rolled back at 25%" in text and "p99 latency" in text and served in text
    assert str(mlflow.get_alias("fashion-mnist", "champion").version) == served_version  # alias restored
    info = _get(f"{url}/info")
    assert info["model_uri"] == served and "challenger" not in info.get("serving", {})
    assert str(bad) != served_version

    good = register(mlflow, tags[2], 0.92, seed=5)
    result = rollout(resources, FAST_CANARY)
    assert result.success, endpoint_failure(result)
    endpoint = next(e.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key == endpoint_key(FAM))
    record = endpoint.metadata["rollout"].value
    assert record["strategy"] == "canary" and record["passed"] and record["from"] == served
    assert [step["share"] for step in record["steps"]] == [0.25, 1.0]
    assert all(step["canary_requests"] >= 5 and step["canary_errors"] == 0 for step in record["steps"])
    info = _get(f"{url}/info")
    assert info["model_uri"].endswith(f"/{good}") and "challenger" not in info.get("serving", {})
    assert str(mlflow.get_alias("fashion-mnist", "champion").version) == str(good)


def test_shadow_records_the_challenger_without_answering_with_it(stack):
    tags, mlflow, resources, url = stack
    served = _get(f"{url}/info")["model_uri"]
    new = register(mlflow, tags[1], 0.94, seed=6)
    result = rollout(resources, {"rollout": "shadow", "shadow_seconds": 0.5, "canary_min_requests": 5})
    assert result.success, endpoint_failure(result)
    endpoint = next(e.materialization for e in result.get_asset_materialization_events()
                    if e.asset_key == endpoint_key(FAM))
    (step,) = endpoint.metadata["rollout"].value["steps"]
    assert step["mode"] == "shadow" and step["shadow_items"] >= 5 and step["shadow_errors"] == 0
    assert 0.0 <= step["shadow_agreement"] <= 1.0
    assert endpoint.metadata["rollout"].value["from"] == served
    assert _get(f"{url}/info")["model_uri"].endswith(f"/{new}")


def test_bad_rollout_setting_fails_before_anything_changes(stack):
    tags, mlflow, resources, url = stack
    served = _get(f"{url}/info")["model_uri"]
    register(mlflow, tags[0], 0.96, seed=7)
    result = rollout(resources, {"rollout": "canary", "canary_steps": [0.5, 0.25]})
    assert not result.success
    assert "must rise and end at 1.0" in endpoint_failure(result)
    assert _get(f"{url}/info")["model_uri"] == served

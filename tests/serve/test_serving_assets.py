"""evaluation + champion + endpoint against a real local Serve over HTTP, real MLflow and a real registry with
a holdout. The models are hand-made linear detectors with known skill: one that knows classes S predicts a
synthetic image of class k right exactly when k is in S. So which model is better on which rows is known.

- the first model is promoted and deployed; an easier validation split never promotes a model that is worse
  on the holdout; a better one hot-reloads the endpoint; aliases move in two steps;
- two partitions rolled out one after another each judge their own model, and the better one ends champion;
  a rollout whose evaluation scored another champion is refused;
- a bad endpoint setting, a canary rollback and a stats poll that dies mid-canary leave alias and endpoint on
  the champion; a Serve restart is repaired by the next rollout.

The family is declared here (`fashion_mnist_e2e`, an image family): the asset factories are configuration."""

import json
import threading
import time
import urllib.request

import dagster as dg
import numpy as np
import pytest

from ocm_assets.evaluation import evaluation_key
from ocm_assets.families import Family
from ocm_assets.serving import build_serving_assets, champion_key, endpoint_key
from ocm_assets.training import model_key
from ocm_ml import sources
from ocm_ml.promotion import Gate
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.prediction_logs import PredictionLogStore
from ocm_resources.serve_control import ServeControl
from tests.registry_helpers import CLASSES, image_split, new_registry, publish_holdout

FAM = Family("fashion_mnist_e2e", "fashion-mnist", "image", "test family",
             gate=Gate(floors={"accuracy": 0.3}, win_metric="accuracy", win_margin=0.01))
ALL = set(range(10))


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def detector(knows: set[int]):
    """Linear model on normalized (N, 1, 28, 28) input: logit k = mean of band k (rows 2k+3..2k+5) for the
    classes it knows, a constant below any band for the rest."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.fill_(-100.0)
        for k in knows:
            band = torch.zeros(28, 28)
            band[2 * k + 3 : 2 * k + 6, 4:24] = 1.0
            net[1].weight[k] = band.reshape(-1) / band.sum()
            net[1].bias[k] = 0.0
    return net.eval()


def version_tables(seed: int, val_classes: set[int] = ALL, n_train: int = 40, n_val: int = 60):
    train, val = image_split(n_train, seed), image_split(n_val * 3, seed + 1)
    keep = np.isin(val.labels, sorted(val_classes))
    val = sources.ImageSplit(val.images[keep][:n_val], val.labels[keep][:n_val])
    mean, std = sources.pixel_stats(train.images)
    return ({"train": sources.image_table(train), "val": sources.image_table(val)},
            {"normalization": {"mean": mean, "std": std}, "classes": CLASSES})


@pytest.fixture(scope="module")
def stack(tmp_path_factory, serve_http):
    from ray import serve

    serve.delete(FAM.name)  # a left-over app of an interrupted run
    root = tmp_path_factory.mktemp("serving-assets")
    pub, reg = new_registry(root)
    publish_holdout(pub, n=200)
    port = int(serve_http.rsplit(":", 1)[1])
    mlflow = LocalMlflow(home=str(root), env_name="e2e")
    resources = {"mlflow": mlflow, "registry": reg, "serve": ServeControl(address=None, http_port=port),
                 "prediction_logs": PredictionLogStore(root=None)}
    import mlflow as ml

    tracking = ml.get_tracking_uri()
    with dg.instance_for_test() as instance:
        yield pub, mlflow, resources, instance, f"{serve_http}/{FAM.name}"
    serve.delete(FAM.name)
    ml.set_tracking_uri(tracking)
    ml.set_registry_uri(None)  # unset again: later tests register into their own tracking store
    __import__('os').environ.pop('MLFLOW_REGISTRY_URI', None)


@pytest.fixture(autouse=True)
def _stack_mlflow_uris(request):
    """tests/conftest.py restores MLflow's process-wide URIs after every test: point them at the module's
    store again before each test that uses it (the tests here log runs through the fluent API)."""
    if "stack" in request.fixturenames:
        import mlflow as ml

        mlflow = request.getfixturevalue("stack")[1]
        ml.set_tracking_uri(mlflow.resolved_tracking_uri())
        ml.set_registry_uri(mlflow.resolved_registry_uri())


def new_version(pub, instance, version: str, knows: set[int], mlflow, val_classes: set[int] = ALL,
                seed: int = 0):
    """Publish a version, register a detector that knows ``knows`` for its partition; returns (tag,
    version)."""
    import mlflow as ml

    v = pub.publish("fashion-mnist", version, *version_tables(seed, val_classes))
    instance.add_dynamic_partitions(FAM.partitions_name, [v.tag])
    with mlflow.start_run("e2e.fashion-mnist", run_name=f"detector {v.tag}",
                          tags=mlflow.lineage_tags(v.tag, v.commit, "dagster-run", v.tag)):
        info = ml.pytorch.log_model(detector(knows), name="model", serialization_format="pickle",
                                    pip_requirements=["torch"])
    return v.tag, str(mlflow.register(info.model_uri, "fashion-mnist", tags=mlflow.lineage_tags(
        v.tag, v.commit, "dagster-run", v.tag)).version)


def rollout(resources, instance, tag, endpoint_config=None, selection=None):
    assets = [dg.SourceAsset(model_key(FAM),
                             partitions_def=dg.DynamicPartitionsDefinition(name=FAM.partitions_name)),
              *build_serving_assets(FAM)]
    run_config = {"ops": {f"{FAM.name}__endpoint": {"config": endpoint_config}}} if endpoint_config else None
    selection = selection or [evaluation_key(FAM), champion_key(FAM), endpoint_key(FAM)]
    partitioned = evaluation_key(FAM) in selection  # else a run of the unpartitioned assets, named by its tag
    return dg.materialize(assets, resources=resources, raise_on_error=False, run_config=run_config,
                          instance=instance, partition_key=tag if partitioned else None,
                          tags=None if partitioned else {"ocm/registry_tag": tag}, selection=selection)


def checks(result):
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def materialization(result, key):
    return next(e.materialization for e in result.get_asset_materialization_events() if e.asset_key == key)


def failure(result, step: str = "endpoint") -> str:
    return next(e for e in result.all_events
                if e.is_step_failure and e.step_key.endswith(step)).step_failure_data.error.to_string()


def aliases(mlflow) -> dict[str, str | None]:
    return {a: (str(v.version) if (v := mlflow.get_alias("fashion-mnist", a)) else None)
            for a in ("champion", "challenger")}


def test_promote_refuse_an_easier_validation_split_and_reload(stack):
    pub, mlflow, resources, instance, url = stack
    t1, v1 = new_version(pub, instance, "1.0.0", set(range(8)), mlflow, seed=0)  # ~80 % anywhere
    result = rollout(resources, instance, t1)
    assert result.success, failure(result)
    own_split_v1 = materialization(result, evaluation_key(FAM)).metadata["evaluation"].value["scores"]
    assert checks(result) == {"promoted": True, "health": True, "known_answer": True}
    assert materialization(result, endpoint_key(FAM)).metadata["action"].value == "deployed"
    assert aliases(mlflow) == {"champion": v1, "challenger": None}
    info = _get(f"{url}/info")
    assert info["model_uri"].endswith(f"/{v1}") and info["data_version"] == t1

    # v2 only knows classes 0-6, and its version's validation split only holds classes 0-6: by the old rule
    # (each model's val_accuracy on its own split) it would win; on the same holdout rows it is worse.
    t2, v2 = new_version(pub, instance, "1.1.0", set(range(7)), mlflow, val_classes=set(range(7)), seed=2)
    result = rollout(resources, instance, t2)
    assert result.success, failure(result)
    evaluation = materialization(result, evaluation_key(FAM)).metadata["evaluation"].value
    scores = evaluation["scores"]
    assert scores["challenger"]["val"]["accuracy"] == 1.0 > own_split_v1["challenger"]["val"]["accuracy"]
    # on the same rows: equal on v2's easy split, worse on the holdout
    assert scores["champion"]["val"]["accuracy"] == 1.0
    assert scores["challenger"]["holdout"]["accuracy"] < scores["champion"]["holdout"]["accuracy"]
    assert scores["challenger"]["holdout"]["rows"] == scores["champion"]["holdout"]["rows"] == 200
    assert evaluation["challenger_version"] == int(v2) and evaluation["champion_version"] == int(v1)
    # per class: the challenger gets classes 7-9 wrong, the champion 8-9
    assert scores["challenger"]["holdout"]["per_class_accuracy"][7] == 0.0
    assert scores["champion"]["holdout"]["per_class_accuracy"][7] == 1.0
    champion = materialization(result, champion_key(FAM))
    assert champion.metadata["decision"].value == "kept"
    assert "does not beat the champion's" in champion.metadata["reasons"].value
    assert checks(result)["promoted"] is False
    assert materialization(result, endpoint_key(FAM)).metadata["action"].value == "kept"
    assert aliases(mlflow) == {"champion": v1, "challenger": None}
    assert _get(f"{url}/info")["model_uri"].endswith(f"/{v1}")

    # the evaluation run in MLflow names both model versions
    run = mlflow.client.get_run(evaluation["mlflow_run_id"])
    assert run.data.tags["challenger_model_version"] == v2 and run.data.tags["champion_model_version"] == v1
    assert run.data.metrics["challenger_holdout_accuracy"] == scores["challenger"]["holdout"]["accuracy"]
    assert mlflow.version("fashion-mnist", v2).tags["evaluation_run_id"] == run.info.run_id

    t3, v3 = new_version(pub, instance, "1.2.0", ALL, mlflow, seed=4)
    result = rollout(resources, instance, t3)
    assert result.success, failure(result)
    assert materialization(result, endpoint_key(FAM)).metadata["action"].value == "reconfigured"
    assert aliases(mlflow) == {"champion": v3, "challenger": None}
    info = _get(f"{url}/info")
    assert info["model_uri"].endswith(f"/{v3}") and info["data_version"] == t3


def test_each_rollout_judges_its_own_partition_and_the_better_ends_champion(stack):
    pub, mlflow, resources, instance, url = stack
    before = aliases(mlflow)["champion"]
    t_worse, v_worse = new_version(pub, instance, "2.0.0", set(range(6)), mlflow, seed=6)
    t_best, v_best = new_version(pub, instance, "2.1.0", ALL, mlflow, seed=8)
    # both partitions retrained; the better one (registered last) rolls out first, then the other
    result = rollout(resources, instance, t_best)
    assert result.success, failure(result)
    record = materialization(result, evaluation_key(FAM)).metadata["evaluation"].value
    assert record["challenger_version"] == int(v_best)  # its own model, not "the latest version"
    result = rollout(resources, instance, t_worse)
    assert result.success, failure(result)
    record = materialization(result, evaluation_key(FAM)).metadata["evaluation"].value
    assert (record["challenger_version"] == int(v_worse)
            and record["champion_version"] == int(aliases(mlflow)["champion"]))
    assert materialization(result, champion_key(FAM)).metadata["decision"].value == "kept"
    final = aliases(mlflow)["champion"]
    assert final in (before, v_best)  # v_best ties the 100 % champion or replaces a weaker one
    assert final != v_worse and _get(f"{url}/info")["model_uri"].endswith(f"/{final}")

    # an evaluation that scored another champion than the current one is refused, not judged
    t_late, _ = new_version(pub, instance, "2.2.0", set(range(9)), mlflow, seed=10)
    assert rollout(resources, instance, t_late, selection=[evaluation_key(FAM)]).success
    mlflow.set_alias("fashion-mnist", "champion", v_worse)  # another rollout moved the champion meanwhile
    try:
        result = rollout(resources, instance, t_late, selection=[champion_key(FAM), endpoint_key(FAM)])
        assert not result.success and "materialize the evaluation again" in failure(result, "champion")
    finally:
        mlflow.set_alias("fashion-mnist", "champion", final)


def test_the_rollout_job_runs_one_at_a_time_per_family(tmp_path):
    from ocm_assets.serving import rollout_job
    from ocm_resources.env import LOCAL_INSTANCE_YAML, ROLLOUT_TAG

    job = rollout_job(FAM)
    assert job.tags[ROLLOUT_TAG] == FAM.name
    (tmp_path / "dagster.yaml").write_text(LOCAL_INSTANCE_YAML)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {"key": ROLLOUT_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits


FAST_CANARY = {"rollout": "canary", "canary_steps": [0.25, 1.0], "canary_step_seconds": 0.5,
               "canary_min_requests": 5, "canary_max_p99_ms": 5000.0, "rollout_timeout_seconds": 60.0}


def test_failures_after_the_gate_leave_alias_and_endpoint_on_the_champion(stack):
    pub, mlflow, resources, instance, url = stack
    champion = aliases(mlflow)["champion"]
    served = _get(f"{url}/info")["model_uri"]
    assert served.endswith(f"/{champion}")
    # make the next challenger clearly better: a weak champion first
    t_weak, v_weak = new_version(pub, instance, "3.0.0", set(range(5)), mlflow, seed=12)
    mlflow.set_alias("fashion-mnist", "champion", v_weak)
    assert rollout(resources, instance, t_weak).success  # kept (same version), endpoint restored to v_weak
    served = _get(f"{url}/info")["model_uri"]
    assert served.endswith(f"/{v_weak}")

    t_new, v_new = new_version(pub, instance, "3.1.0", ALL, mlflow, seed=14)
    for bad in ({"max_batch": 0}, {"known_answer_rows": 0}):
        result = rollout(resources, instance, t_new, bad)
        assert not result.success and checks(result)["promoted"]
        assert "nothing was changed" in failure(result)
        assert aliases(mlflow) == {"champion": v_weak, "challenger": None}
        assert _get(f"{url}/info")["model_uri"] == served

    result = rollout(resources, instance, t_new, {**FAST_CANARY, "canary_max_p99_ms": 0.001})
    assert not result.success
    text = failure(result)
    assert "rolled back at 25%" in text and f"serves the champion {served} again" in text
    assert aliases(mlflow) == {"champion": v_weak, "challenger": None}
    info = _get(f"{url}/info")
    assert info["model_uri"] == served and "challenger" not in info.get("serving", {})


def test_a_stats_poll_that_dies_mid_canary_rolls_back(stack):
    """The replica the canary reads its stats from is killed while the challenger takes traffic: the rollout
    cannot judge it, so it rolls back (the alias never moved) and the endpoint serves the champion."""
    import ray

    pub, mlflow, resources, instance, url = stack
    champion = aliases(mlflow)["champion"]
    served = _get(f"{url}/info")["model_uri"]
    t_new, _ = new_version(pub, instance, "4.0.0", ALL, mlflow, seed=16)
    killed = []

    def kill_replica_once_canary_runs():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            try:
                share = (_get(f"{url}/info").get("serving") or {}).get("challenger", {}).get("share", 0)
            except OSError:
                share = 0
            if share and share > 0:
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    if actor["name"].startswith(f"SERVE_REPLICA::{FAM.name}#"):
                        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
                        killed.append(actor["name"])
                return
            time.sleep(0.05)

    # a long first step, so that the kill lands while the canary is judged
    canary = {**FAST_CANARY, "canary_steps": [0.25, 1.0], "canary_step_seconds": 20.0,
              "canary_min_requests": 100000, "canary_max_p99_ms": 60000.0, "rollout_timeout_seconds": 40.0}
    killer = threading.Thread(target=kill_replica_once_canary_runs, daemon=True)
    killer.start()
    result = rollout(resources, instance, t_new, canary)
    killer.join(timeout=5)
    assert killed, "the canary never started"
    assert not result.success
    assert "did not answer" in failure(result) or "rolled back" in failure(result)
    assert aliases(mlflow) == {"champion": champion, "challenger": None}
    assert _get(f"{url}/info")["model_uri"] == served


def test_a_lost_endpoint_is_redeployed_by_the_next_rollout(stack):
    """After a Ray restart the Serve apps are gone: a rollout that keeps the champion deploys it again."""
    from ray import serve

    pub, mlflow, resources, instance, url = stack
    champion = aliases(mlflow)["champion"]
    tag = mlflow.version("fashion-mnist", champion).tags["dagster_partition"]
    serve.delete(FAM.name)
    result = rollout(resources, instance, tag)
    assert result.success, failure(result)
    assert materialization(result, champion_key(FAM)).metadata["decision"].value == "kept"
    assert materialization(result, endpoint_key(FAM)).metadata["action"].value == "deployed"
    assert _get(f"{url}/info")["model_uri"].endswith(f"/{champion}")


def test_endpoint_without_long_lived_cluster_says_what_to_do(tmp_path):
    from ocm_resources.serve_control import ServeError

    control = ServeControl(address="auto", temp_dir=str(tmp_path / "no-head"))
    with pytest.raises(ServeError, match="make dev"):
        control.connect()

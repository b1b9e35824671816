"""The loop, end to end on the real definitions: a new tag -> one registry-sensor tick -> its ingest run of
the dataset -> the rest only by automation conditions (evaluated per automation sensor with Dagster's own
helper, runs executed in-process as the daemon would launch them): preprocessing and training, evaluation,
the gate and the endpoint -> a new champion served, checked over HTTP. A bad version fails its blocking
check and the conditions ask for nothing more: the endpoint keeps serving the old champion."""

import json
import urllib.request

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from ocm_assets.build import build_definitions
from ocm_assets.families import Family
from ocm_ml.promotion import Gate
from ocm_resources.env import ROLLOUT_TAG
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.ray import RayHead
from ocm_resources.serve_control import ServeControl
from ocm_resources.storage import CheckpointStorage
from tests.automation_helpers import drive
from tests.registry_helpers import image_version, new_registry, publish_holdout

# An image family of its own (route /fashion_mnist_loop), so this test never touches other tests' apps.
# Its gate has no floors (the synthetic data is small); a new version must still win by one point.
FASHION = Family("fashion_mnist_loop", "fashion-mnist", "image", "e2e loop test family",
                 gate=Gate(floors={"accuracy": 0.0}, win_margin=0.01))
TRAIN = {"num_workers": 2, "batch_size": 32, "epochs": 2, "learning_rate": 3e-3, "seed": 0}
#: What a deployment sets as the launchpad defaults; automation runs take no other config.
RUN_CONFIG = {"ops": {f"{FASHION.name}__model": {"config": TRAIN}}}
#: The sensors of the chain under test (the monitoring part has its own tests).
CHAIN = (f"{FASHION.name}_training_automation", f"{FASHION.name}_rollout_automation")


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def noisy_version():
    """A training split with shuffled labels: a weak first champion on the holdout."""
    tables, metadata = image_version(n_train=320, n_val=80, seed=0)
    train = tables["train"]
    labels = np.random.default_rng(0).permutation(train.column("label").to_numpy())
    tables["train"] = train.set_column(1, "label", pa.array(labels, type=pa.int64()))
    return tables, metadata


@pytest.fixture(scope="module")
def loop(tmp_path_factory, serve_http):
    from ray import serve

    serve.delete(FASHION.name)  # a left-over app of an interrupted run
    root = tmp_path_factory.mktemp("loop")
    pub, reg = new_registry(root)
    publish_holdout(pub)
    resources = {
        "registry": reg,
        "ray_cluster": RayHead(keep_alive=True),
        "mlflow": LocalMlflow(home=str(root), env_name="loop"),
        "checkpoints": CheckpointStorage(base_path=str(root / "ray-results")),
        "serve": ServeControl(address=None, http_port=int(serve_http.rsplit(":", 1)[1])),
    }
    defs = build_definitions(resources=resources, families=(FASHION,))
    import mlflow

    tracking = mlflow.get_tracking_uri()
    with dg.instance_for_test() as instance:
        yield pub, defs, instance, f"{serve_http}/{FASHION.name}"
    serve.delete(FASHION.name)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(None)  # unset again: later tests register into their own tracking store
    __import__('os').environ.pop('MLFLOW_REGISTRY_URI', None)


def tick(defs, instance, cursor):
    repo = defs.get_repository_def()
    with dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), cursor=cursor,
                                 repository_def=repo, resources=dict(defs.resources)) as ctx:
        result = repo.get_sensor_def(FASHION.sensor_name).evaluate_tick(ctx)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def ingest(defs, instance, request):
    """The registry sensor's run (the dataset alone), as the daemon launches it."""
    job = defs.resolve_job_def(request.job_name or f"{FASHION.name}_ingest")
    assert set(job.asset_layer.selected_asset_keys) == {dg.AssetKey([FASHION.name, "dataset"])}
    return job.execute_in_process(instance=instance, partition_key=request.partition_key, tags=request.tags,
                                  raise_on_error=False)


def chain(ticks):
    """(sensor, partition, assets, succeeded) of every run the conditions asked for, in order."""
    return [run for tick in ticks for run in tick.runs]


def expected_chain(tag):
    training, rollout = f"{FASHION.name}_training_automation", f"{FASHION.name}_rollout_automation"
    return [
        (training, tag, (f"{FASHION.name}/model", f"{FASHION.name}/preprocessing"), True),
        (rollout, tag, (f"{FASHION.name}/evaluation",), True),
        (rollout, None, (f"{FASHION.name}/champion", f"{FASHION.name}/endpoint"), True),
    ]


def run_of(ticks, asset):
    return next(r for tick in ticks for key, r in tick.results.items() if asset in key)


def test_new_tag_retrains_promotes_and_serves_then_bad_tag_is_stopped(loop):
    pub, defs, instance, url = loop
    cursors = {}
    # the daemon ticks before any data: nothing to do
    assert drive(defs, instance, cursors, RUN_CONFIG, only=CHAIN) == []
    v1 = pub.publish("fashion-mnist", "1.0.0", *noisy_version())
    first = tick(defs, instance, None)
    (request,) = first.run_requests
    assert ingest(defs, instance, request).success
    ticks = drive(defs, instance, cursors, RUN_CONFIG, only=CHAIN)
    assert chain(ticks) == expected_chain(v1.tag)
    for tick_ in ticks:
        for key, result in tick_.results.items():
            tags = instance.get_run_by_id(result.run_id).tags
            assert (tags.get(ROLLOUT_TAG) == FASHION.name) == any(
                part in key for part in ("evaluation", "champion", "endpoint")), (key, tags)
    info = _get(f"{url}/info")
    assert info["data_version"] == v1.tag and info["dvc_commit"] == v1.commit
    assert info["dagster_run_id"] == run_of(ticks, "model").run_id

    v2 = pub.publish("fashion-mnist", "1.1.0", *image_version(n_train=320, n_val=80, seed=3))
    second = tick(defs, instance, first.cursor)
    assert [r.partition_key for r in second.run_requests] == [v2.tag]
    assert ingest(defs, instance, second.run_requests[0]).success
    ticks = drive(defs, instance, cursors, RUN_CONFIG, only=CHAIN)
    rollout = run_of(ticks, "endpoint")
    assert chain(ticks) == expected_chain(v2.tag), [(e.check_name, e.passed)
                                                    for e in rollout.get_asset_check_evaluations()]
    info = _get(f"{url}/info")
    assert info["data_version"] == v2.tag and info["model_version"] in ("2", 2)
    pred = urllib.request.Request(f"{url}/predict", data=json.dumps({"images": [[0] * 784]}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(pred, timeout=30) as resp:
        assert json.loads(resp.read())["data_version"] == v2.tag

    bad_tables, metadata = image_version(n_train=320, n_val=80, seed=4)
    hot = bad_tables["train"].column("image").to_pylist()
    hot[0][0] = 300
    bad_tables["train"] = bad_tables["train"].set_column(
        0, "image", pa.array(hot, type=pa.list_(pa.int64())))
    v3 = pub.publish("fashion-mnist", "1.2.0", bad_tables, metadata)
    third = tick(defs, instance, second.cursor)
    failed = ingest(defs, instance, third.run_requests[0])
    assert not failed.success
    checks = {e.check_name: e.passed for e in failed.get_asset_check_evaluations()}
    assert checks == {"schema": False}
    # the failed blocking check stops the chain: no condition asks for anything, and the endpoint still
    # serves v1.1.0
    assert drive(defs, instance, cursors, RUN_CONFIG, only=CHAIN) == []
    assert _get(f"{url}/info")["data_version"] == v2.tag
    assert v3.tag not in json.dumps(_get(f"{url}/info"))

"""Declarative automation below the dataset, evaluated with Dagster's own helper
(``dg.evaluate_automation_conditions``, driven per automation sensor as the daemon does:
``tests/automation_helpers.py``). The whole chain to a served endpoint is ``tests/serve/test_e2e_loop.py``;
here, without Ray: what the definitions declare, and that a failed blocking check stops the chain."""

import dagster as dg
import pyarrow as pa
import pytest

from ocm_assets.build import build_definitions
from ocm_assets.families import FAMILIES, family
from ocm_resources.env import ROLLOUT_TAG, build_resources
from tests.automation_helpers import automation_sensors
from tests.registry_helpers import image_version, new_registry

FASHION = family("fashion_mnist")
CHAIN = {"dataset", "preprocessing", "hpo", "model", "evaluation", "champion", "endpoint"}


def _defs(registry=None):
    resources = build_resources("local")
    return build_definitions(resources={**resources, **({"registry": registry} if registry else {})})


def test_every_asset_below_the_dataset_runs_by_an_automation_condition():
    defs = _defs()
    graph = defs.resolve_asset_graph()
    sensors = {s.name: s for s in automation_sensors(defs)}
    assert not any(s.name.endswith("_rollout_sensor") for s in defs.sensors)  # the run-status chain is gone
    for fam in FAMILIES:
        # the chain from the registry to the endpoint (the monitoring assets after it have their own tests)
        keys = {k for k in graph.get_all_asset_keys() if k.path[0] == fam.name and k.path[1] in CHAIN}
        dataset = dg.AssetKey([fam.name, "dataset"])
        assert graph.get(dataset).automation_condition is None  # asked for by the registry sensor
        conditioned = {k for k in keys if graph.get(k).automation_condition is not None}
        assert conditioned == keys - {dataset}
        training, rollout = (sensors[f"{fam.name}_training_automation"],
                             sensors[f"{fam.name}_rollout_automation"])
        assert {s.default_status for s in (training, rollout)} == {dg.DefaultSensorStatus.RUNNING}
        covered = training.asset_selection.resolve(graph) | rollout.asset_selection.resolve(graph)
        assert covered == conditioned and not (training.asset_selection.resolve(graph)
                                               & rollout.asset_selection.resolve(graph))
        assert {k.path[1] for k in rollout.asset_selection.resolve(graph)} == {"evaluation", "champion",
                                                                              "endpoint"}
        assert rollout.run_tags[ROLLOUT_TAG] == fam.name and ROLLOUT_TAG not in training.run_tags
        labels = {k.path[1]: graph.get(k).automation_condition.get_label() for k in conditioned}
        assert labels["champion"] == "after_an_evaluation" and labels["endpoint"] == "eager"
        assert (labels["model"] == labels["preprocessing"] == labels["evaluation"]
                == "eager_after_blocking_checks")
        registry_sensor = defs.get_sensor_def(fam.sensor_name)
        assert registry_sensor.job_name == f"{fam.name}_ingest"
        assert defs.get_job_def(registry_sensor.job_name).asset_layer.selected_asset_keys == {dataset}


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _ingest(defs, instance, cursor=None):
    """A registry-sensor tick and its runs of ``<family>_ingest``, as the daemon would launch them."""
    repo = defs.get_repository_def()
    with dg.build_sensor_context(cursor=cursor, instance=instance, instance_ref=instance.get_ref(),
                                 repository_def=repo, resources=dict(defs.resources)) as ctx:
        result = repo.get_sensor_def(FASHION.sensor_name).evaluate_tick(ctx)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    job = defs.resolve_job_def(f"{FASHION.name}_ingest")
    runs = {req.partition_key: job.execute_in_process(instance=instance, partition_key=req.partition_key,
                                                      tags=req.tags, raise_on_error=False)
            for req in result.run_requests}
    return result, runs


def test_a_failed_schema_check_stops_the_chain_a_passing_one_starts_it(tmp_path, instance):
    pub, reg = new_registry(tmp_path)
    good = pub.publish("fashion-mnist", "1.0.0", *image_version(n_train=40, n_val=10))
    tables, metadata = image_version(n_train=40, n_val=10, seed=4)
    pixels = tables["train"].column("image").to_pylist()
    pixels[0][0] = 300  # out of 0-255: the pandera schema check fails
    tables["train"] = tables["train"].set_column(0, "image", pa.array(pixels, type=pa.list_(pa.int64())))
    bad = pub.publish("fashion-mnist", "1.1.0", tables, metadata)
    defs = _defs(reg)
    training = next(s for s in automation_sensors(defs) if s.name == f"{FASHION.name}_training_automation")
    rollout = next(s for s in automation_sensors(defs) if s.name == f"{FASHION.name}_rollout_automation")
    # the daemon's sensors tick all along: a first evaluation before any data
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                               asset_selection=training.asset_selection)
    assert before.total_requested == 0

    _, runs = _ingest(defs, instance)
    assert runs[good.tag].success and not runs[bad.tag].success
    dataset = dg.AssetKey([FASHION.name, "dataset"])
    # the bad version's dataset *is* materialized (its data version recorded); only its blocking check failed
    assert instance.get_latest_materialization_event(dataset) is not None
    assert {e.check_name: e.passed for e in runs[bad.tag].get_asset_check_evaluations()} == {"schema": False}

    first = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                              asset_selection=training.asset_selection,
                                              cursor=before.cursor)
    for step in ("preprocessing", "model"):  # one run: the model waits on preprocessing within it
        assert first.get_requested_partitions(dg.AssetKey([FASHION.name, step])) == {good.tag}
    # the rollout part waits for a model; nothing asks for the bad version, now or on later ticks
    early = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                              asset_selection=rollout.asset_selection)
    assert early.total_requested == 0
    again = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                              asset_selection=training.asset_selection,
                                              cursor=first.cursor)
    assert again.total_requested == 0


def test_a_moved_tag_with_the_schema_fixed_starts_the_chain(tmp_path, instance):
    """The stopped partition is not stuck: once its tag moves to data that passes, the sensor ingests it
    again and the conditions take over (only the preprocessing condition is evaluated: no Ray here)."""
    pub, reg = new_registry(tmp_path)
    tables, metadata = image_version(n_train=40, n_val=10, seed=4)
    pixels = tables["train"].column("image").to_pylist()
    pixels[0][0] = 300
    broken = {**tables,
              "train": tables["train"].set_column(0, "image", pa.array(pixels, type=pa.list_(pa.int64())))}
    v1 = pub.publish("fashion-mnist", "1.0.0", broken, metadata)
    defs = _defs(reg)
    preprocessing = dg.AssetKey([FASHION.name, "preprocessing"])
    selection = dg.AssetSelection.assets(preprocessing)
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
    cursor, runs = _ingest(defs, instance)
    assert not runs[v1.tag].success
    stopped = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                                cursor=before.cursor)
    assert stopped.total_requested == 0

    pub.publish("fashion-mnist", "1.0.0", tables, metadata, force=True)
    _, runs = _ingest(defs, instance, cursor.cursor)
    assert runs[v1.tag].success
    started = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection,
                                                cursor=stopped.cursor)
    assert started.get_requested_partitions(preprocessing) == {v1.tag}

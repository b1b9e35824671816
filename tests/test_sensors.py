"""Registry sensors: new, moved, deleted and malformed tags; cursor and re-ticks."""

import json
import subprocess

import dagster as dg
import pytest

from ocm_assets.build import build_definitions
from ocm_assets.families import family
from ocm_resources.env import build_resources
from tests.registry_helpers import image_version, new_registry

FASHION = family("fashion_mnist")


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def tick(registry, instance, cursor=None):
    """One sensor evaluation, then what the daemon does with its partition requests."""
    repo = build_definitions(resources={**build_resources("local"), "registry": registry}).get_repository_def()
    sensor = repo.get_sensor_def(FASHION.sensor_name)
    with dg.build_sensor_context(
        cursor=cursor, instance=instance, instance_ref=instance.get_ref(), repository_def=repo,
        resources={"registry": registry},
    ) as context:
        result = sensor.evaluate_tick(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


@pytest.fixture
def registry(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = image_version(n_train=40, n_val=10)
    v1 = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    return pub, reg, v1, (tables, metadata)


def test_new_tag_becomes_partition_and_run(registry, instance):
    pub, reg, v1, _ = registry
    result = tick(reg, instance)
    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [(v1.tag, f"{v1.tag}@{v1.commit}")]
    assert result.run_requests[0].job_name in (None, FASHION.retrain_job_name)
    (request,) = result.dynamic_partitions_requests
    assert request.partitions_def_name == FASHION.partitions_name and list(request.partition_keys) == [v1.tag]
    assert json.loads(result.cursor)["tags"] == {v1.tag: v1.commit}

    # re-tick: nothing new
    again = tick(reg, instance, result.cursor)
    assert again.run_requests == [] and again.dynamic_partitions_requests == []
    assert "none new or moved" in again.skip_message
    assert again.cursor == result.cursor


def test_second_version_and_moved_tag(registry, instance):
    pub, reg, v1, (tables, metadata) = registry
    cursor = tick(reg, instance).cursor
    v2 = pub.publish("fashion-mnist", "1.1.0", *image_version(n_train=40, n_val=10, seed=3))
    result = tick(reg, instance, cursor)
    assert [r.partition_key for r in result.run_requests] == [v2.tag]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == [v2.tag]
    cursor = result.cursor

    moved = pub.publish("fashion-mnist", "1.0.0", *image_version(n_train=40, n_val=10, seed=9), force=True)
    result = tick(reg, instance, cursor)
    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [(v1.tag, f"{v1.tag}@{moved.commit}")]
    assert result.run_requests[0].tags["ocm/trigger"] == "moved"
    assert result.dynamic_partitions_requests == []  # the partition already exists

    # a partition deleted by hand is re-created for the run that needs it
    instance.delete_dynamic_partition(FASHION.partitions_name, v2.tag)
    pub.publish("fashion-mnist", "1.1.0", *image_version(n_train=40, n_val=10, seed=11), force=True)
    result = tick(reg, instance, result.cursor)
    assert list(result.dynamic_partitions_requests[0].partition_keys) == [v2.tag]


def test_deleted_and_malformed_tags_are_reported_not_fatal(registry, instance):
    pub, reg, v1, (tables, metadata) = registry
    v2 = pub.publish("fashion-mnist", "1.1.0", tables, metadata)
    cursor = tick(reg, instance).cursor
    pub.delete_tag(v2.tag)
    subprocess.run(["git", "tag", "fashion-mnist-vnext"], cwd=pub.root, check=True)
    result = tick(reg, instance, cursor)
    assert result.run_requests == []
    assert "deleted: fashion-mnist-v1.1.0" in result.skip_message
    assert "malformed tags ignored: fashion-mnist-vnext" in result.skip_message
    assert json.loads(result.cursor)["tags"] == {v1.tag: v1.commit}


def test_unreachable_registry_fails_the_tick_clearly(tmp_path, instance):
    from ocm_resources.registry import DvcRegistry, RegistryError

    with pytest.raises(RegistryError, match="listing tags of the registry"):
        tick(DvcRegistry(repo_url=str(tmp_path / "gone")), instance)


def schedule_tick(registry, instance):
    import datetime

    repo = build_definitions(resources={**build_resources("local"), "registry": registry}).get_repository_def()
    schedule = repo.get_schedule_def(FASHION.schedule_name)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # opt-in
    when = datetime.datetime(2026, 11, 23, 3, 0, tzinfo=datetime.UTC)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=when, repository_def=repo,
                                   resources={"registry": registry}) as context:
        return schedule.evaluate_tick(context)


def test_scheduled_retrain_picks_the_newest_version(registry, instance):
    pub, reg, v1, (tables, metadata) = registry
    v2 = pub.publish("fashion-mnist", "1.10.0", tables, metadata)
    pub.publish("fashion-mnist", "1.9.0", tables, metadata)  # newer tag, older version
    result = schedule_tick(reg, instance)
    (request,) = result.run_requests
    assert request.partition_key == v2.tag and request.tags["ocm/trigger"] == "schedule"
    assert request.run_key.startswith(f"{v2.tag}@{v2.commit}@2026-11-23")
    # turned on before the sensor ever ran: the schedule adds the partition itself
    assert instance.has_dynamic_partition(FASHION.partitions_name, v2.tag)


def test_scheduled_retrain_skips_an_empty_registry(tmp_path, instance):
    _, reg = new_registry(tmp_path)
    result = schedule_tick(reg, instance)
    assert result.run_requests == [] and "no fashion-mnist-v<semver> tags" in result.skip_message

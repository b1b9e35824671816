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
    repo = build_definitions(
        resources={**build_resources("local"), "registry": registry}).get_repository_def()
    sensor = repo.get_sensor_def(FASHION.sensor_name)
    with dg.build_sensor_context(
        cursor=cursor, instance=instance, instance_ref=instance.get_ref(), repository_def=repo,
        resources={"registry": registry},
    ) as context:
        result = sensor.evaluate_tick(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


@dg.op
def _step_ok():
    pass


@dg.op
def _step_fails():
    raise RuntimeError("the registry's DVC remote did not answer (transient)")


@dg.job
def ended_ok():
    _step_ok()


@dg.job
def ended_failed():
    _step_fails()


def daemon_tags(request: dg.RunRequest) -> dict[str, str]:
    """The tags the sensor daemon puts on the run it creates for a run request."""
    return {**request.tags, "dagster/run_key": request.run_key, "dagster/sensor_name": FASHION.sensor_name}


def queue(instance, request: dg.RunRequest) -> dg.DagsterRun:
    """A run record for the request, as the daemon creates it before it submits it (not started)."""
    return instance.create_run_for_job(ended_ok, status=dg.DagsterRunStatus.NOT_STARTED,
                                       tags=daemon_tags(request))


def finish(instance, request: dg.RunRequest, ok: bool) -> str:
    """A real run carrying the request's tags, executed to success or to a failure in its step."""
    result = (ended_ok if ok else ended_failed).execute_in_process(
        instance=instance, tags=daemon_tags(request), raise_on_error=False
    )
    assert result.success is ok
    return result.run_id


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
    assert result.run_requests[0].job_name in (None, f"{FASHION.name}_ingest")  # the dataset only
    (request,) = result.dynamic_partitions_requests
    assert request.partitions_def_name == FASHION.partitions_name and list(request.partition_keys) == [v1.tag]
    assert json.loads(result.cursor)["tags"] == {v1.tag: v1.commit}

    # re-tick while the run is queued: nothing new, the run is still watched
    queue(instance, result.run_requests[0])
    again = tick(reg, instance, result.cursor)
    assert again.run_requests == [] and again.dynamic_partitions_requests == []
    assert ("none new or moved" in again.skip_message
            and "1 run(s) still queued or running" in again.skip_message)
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
    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [
        (v1.tag, f"{v1.tag}@{moved.commit}")]
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

    repo = build_definitions(
        resources={**build_resources("local"), "registry": registry}).get_repository_def()
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
    assert request.tags["ocm/reuse"] == "off"  # a scheduled retrain trains even on data seen before
    assert request.run_key.startswith(f"{v2.tag}@{v2.commit}@2026-11-23")
    # turned on before the sensor ever ran: the schedule adds the partition itself
    assert instance.has_dynamic_partition(FASHION.partitions_name, v2.tag)


def test_scheduled_retrain_skips_an_empty_registry(tmp_path, instance):
    _, reg = new_registry(tmp_path)
    result = schedule_tick(reg, instance)
    assert result.run_requests == [] and "no fashion-mnist-v<semver> tags" in result.skip_message


# --- a sensor that recovers: retries, moved-back tags, a cap per tick, a registry that does not answer ------


def watch_of(result) -> dict:
    return json.loads(result.cursor)["watch"]


def test_failed_run_is_retried_with_a_new_run_key_until_the_retries_run_out(registry, instance):
    from ocm_assets.sensors import MAX_RETRIES

    pub, reg, v1, _ = registry
    result = tick(reg, instance)
    keys = [result.run_requests[0].run_key]
    for attempt in range(2, MAX_RETRIES + 2):
        finish(instance, result.run_requests[0], ok=False)
        result = tick(reg, instance, result.cursor)
        (request,) = result.run_requests
        assert (request.partition_key, request.run_key) == (v1.tag, f"{v1.tag}@{v1.commit}#{attempt}")
        assert request.tags["ocm/trigger"] == "retry" and request.tags["ocm/attempt"] == str(attempt)
        assert request.tags["ocm/registry_commit"] == v1.commit
        assert result.dynamic_partitions_requests == []  # same partition
        assert watch_of(result)[v1.tag] == {"run_key": request.run_key, "attempt": attempt}
        assert json.loads(result.cursor)["tags"] == {v1.tag: v1.commit}
        keys.append(request.run_key)
    assert len(set(keys)) == MAX_RETRIES + 1  # every request can get a run: Dagster skips only a used key

    # the last retry failed too: the sensor gives up on this tag@commit (until the tag moves)
    finish(instance, result.run_requests[0], ok=False)
    gave_up = tick(reg, instance, result.cursor)
    assert gave_up.run_requests == [] and watch_of(gave_up) == {}
    assert f"failed {MAX_RETRIES + 1} times, not asked again: {keys[-1]}" in gave_up.skip_message
    assert tick(reg, instance, gave_up.cursor).run_requests == []


def test_a_run_that_succeeded_or_was_cancelled_is_not_retried(registry, instance):
    pub, reg, v1, (tables, metadata) = registry
    first = tick(reg, instance)
    finish(instance, first.run_requests[0], ok=False)
    # someone re-executed the failed run by hand (a re-execution keeps the run key tag) and it succeeded
    finish(instance, first.run_requests[0], ok=True)
    result = tick(reg, instance, first.cursor)
    assert result.run_requests == [] and watch_of(result) == {}

    v2 = pub.publish("fashion-mnist", "1.1.0", tables, metadata)
    result = tick(reg, instance, result.cursor)
    (request,) = result.run_requests
    assert request.partition_key == v2.tag
    run = queue(instance, request)
    instance.report_run_canceled(run)
    result = tick(reg, instance, result.cursor)
    assert result.run_requests == [] and watch_of(result) == {}


def _force_tag(pub, tag, commit):
    subprocess.run(["git", "tag", "-f", "-a", tag, commit, "-m", f"{tag} back to {commit[:10]}"],
                   cwd=pub.root, check=True, capture_output=True)


def test_a_tag_moved_away_and_back_runs_again(registry, instance):
    pub, reg, v1, _ = registry
    result = tick(reg, instance)
    finish(instance, result.run_requests[0], ok=True)
    moved = pub.publish("fashion-mnist", "1.0.0", *image_version(n_train=40, n_val=10, seed=5), force=True)
    result = tick(reg, instance, result.cursor)
    assert [r.run_key for r in result.run_requests] == [f"{v1.tag}@{moved.commit}"]
    finish(instance, result.run_requests[0], ok=True)

    _force_tag(pub, v1.tag, v1.commit)  # A -> B -> A
    result = tick(reg, instance, result.cursor)
    (request,) = result.run_requests
    # the first run key of A was used: Dagster would skip a request with it, so this one is A's second
    assert (request.partition_key, request.run_key) == (v1.tag, f"{v1.tag}@{v1.commit}#2")
    assert request.tags["ocm/trigger"] == "moved" and request.tags["ocm/attempt"] == "1"
    assert json.loads(result.cursor)["tags"] == {v1.tag: v1.commit}

    # deleted and published again at the same commit: a new run again, with A's third key
    finish(instance, request, ok=True)
    pub.delete_tag(v1.tag)
    result = tick(reg, instance, tick(reg, instance, result.cursor).cursor)
    _force_tag(pub, v1.tag, v1.commit)
    assert [r.run_key for r in result.run_requests] == []
    result = tick(reg, instance, result.cursor)
    assert [r.run_key for r in result.run_requests] == [f"{v1.tag}@{v1.commit}#3"]


def test_twelve_new_tags_are_taken_five_per_tick_oldest_first(registry, instance):
    from ocm_assets.sensors import MAX_RUNS_PER_TICK

    pub, reg, v1, _ = registry
    versions = ["1.0.1", "1.2.0", "1.10.0", "1.9.0", "2.0.0", "1.3.0", "1.4.0", "1.5.0", "1.6.0", "1.7.0",
                "1.8.0"]
    refs = "".join(f"create refs/tags/fashion-mnist-v{v} HEAD\n" for v in versions)
    subprocess.run(["git", "update-ref", "--stdin"], input=refs, text=True, cwd=pub.root, check=True)
    everything = [v.tag for v in reg.list_versions("fashion-mnist")]
    assert len(everything) == 12 and MAX_RUNS_PER_TICK == 5

    cursor, seen = None, []
    for expected in (5, 5, 2):
        result = tick(reg, instance, cursor)
        asked = [r.partition_key for r in result.run_requests]
        assert len(asked) == expected
        # partitions only for these
        assert list(result.dynamic_partitions_requests[0].partition_keys) == asked
        cursor, seen = result.cursor, seen + asked
        # the cursor records exactly the tags asked for so far, so the next tick takes the rest
        assert sorted(json.loads(cursor)["tags"]) == sorted(seen)
        for request in result.run_requests:
            queue(instance, request)
    assert seen == everything  # oldest semver first (1.9.0 before 1.10.0), each once
    assert seen[:3] == ["fashion-mnist-v1.0.0", "fashion-mnist-v1.0.1", "fashion-mnist-v1.2.0"]
    last = tick(reg, instance, cursor)
    assert last.run_requests == [] and len(watch_of(last)) == 12


def test_the_cap_is_configurable_and_retries_come_first(registry, instance):
    from ocm_assets.sensors import build_registry_sensor

    pub, reg, v1, (tables, metadata) = registry
    repo = build_definitions(resources={**build_resources("local"), "registry": reg}).get_repository_def()
    sensor = build_registry_sensor(FASHION, repo.get_job(FASHION.retrain_job_name), max_runs_per_tick=1)

    def one_tick(cursor):
        with dg.build_sensor_context(cursor=cursor, instance=instance, instance_ref=instance.get_ref(),
                                     repository_def=repo, resources={"registry": reg}) as context:
            return sensor.evaluate_tick(context)

    first = one_tick(None)
    finish(instance, first.run_requests[0], ok=False)
    v2 = pub.publish("fashion-mnist", "1.1.0", tables, metadata)
    second = one_tick(first.cursor)
    assert [(r.run_key, r.tags["ocm/trigger"]) for r in second.run_requests] == [
        (f"{v1.tag}@{v1.commit}#2", "retry")]
    assert v2.tag not in json.loads(second.cursor)["tags"]
    queue(instance, second.run_requests[0])
    third = one_tick(second.cursor)
    assert [(r.run_key, r.tags["ocm/trigger"]) for r in third.run_requests] == [
        (f"{v2.tag}@{v2.commit}", "new")]


def test_a_cursor_of_the_earlier_format_still_works(registry, instance):
    pub, reg, v1, (tables, metadata) = registry
    v2 = pub.publish("fashion-mnist", "1.1.0", tables, metadata)
    old = json.dumps({"tags": {v1.tag: v1.commit, v2.tag: v2.commit}, "malformed": []})
    # the earlier sensor asked for <tag>@<commit>: v1's run failed, v2's succeeded
    finish(instance, dg.RunRequest(run_key=f"{v1.tag}@{v1.commit}", tags={"ocm/registry_tag": v1.tag,
           "ocm/registry_commit": v1.commit}), ok=False)
    finish(instance, dg.RunRequest(run_key=f"{v2.tag}@{v2.commit}", tags={"ocm/registry_tag": v2.tag,
           "ocm/registry_commit": v2.commit}), ok=True)
    result = tick(reg, instance, old)
    assert [r.run_key for r in result.run_requests] == [f"{v1.tag}@{v1.commit}#2"]
    assert json.loads(result.cursor)["tags"] == {v1.tag: v1.commit, v2.tag: v2.commit}
    assert watch_of(result) == {v1.tag: {"run_key": f"{v1.tag}@{v1.commit}#2", "attempt": 2}}


def test_a_black_holed_registry_fails_the_tick_within_its_timeout(instance, git_waits):
    """Checks that the tick runs one ``git ls-remote``, waits for it at most ``git_timeout_s``, kills it and
    fails with an error that names the timeout (no wall-clock figure: what git was given and what came
    back)."""
    import socket
    import threading

    from ocm_resources.registry import DvcRegistry, RegistryError

    waits = git_waits  # (git command, timeout it was waited with, the process) per git child
    with socket.socket() as hole:  # accepts connections, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"git://127.0.0.1:{hole.getsockname()[1]}/registry.git"
        reg = DvcRegistry(repo_url=url, git_timeout_s=2)
        outcome = {}

        def run():
            try:
                tick(reg, instance, json.dumps({"tags": {}, "malformed": []}))
            except Exception as exc:  # noqa: BLE001 - handed to the asserting thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)  # a bounded wait, so that a hang fails here instead of hanging the suite
        assert not thread.is_alive(), "the tick hangs on the black-holed registry"
    error = outcome.get("error")
    assert isinstance(error, RegistryError), error
    assert ("listing tags of the registry git://127.0.0.1" in str(error)
            and "no answer within 2 s" in str(error))
    # one git, waited for with the configured timeout (the second wait is the reaping after the kill)
    assert {id(proc) for _, _, proc in waits} == {id(waits[0][2])}, [cmd for cmd, _, _ in waits]
    assert waits[0][0] == ["git", "ls-remote", "--tags", "--", url] and waits[0][1] == 2, waits[0][:2]
    assert waits[0][2].returncode == -9  # killed (SIGKILL) at the timeout and reaped, not left behind

"""Per-family sensors on the data registry: a new tag becomes a partition and a retraining run; and an
optional cron schedule that retrains the newest version (off until someone turns it on).

Registry sensor
---------------
Each tick lists the registry's tags once (``git ls-remote``, bounded by ``DvcRegistry.git_timeout_s``) and
asks for at most ``max_runs_per_tick`` runs (default :data:`MAX_RUNS_PER_TICK`): first retries, then moved
tags, then new tags, each oldest semver first. Tags left over are not written to the cursor, so the next
tick takes them.

Run keys are ``<tag>@<commit>`` for the first run of a commit and ``<tag>@<commit>#<n>`` for the n-th: a
retry after a failure, or the same commit again after the tag moved away and back (A→B→A). The number comes
from the run keys this sensor already used for that tag and commit, read from the instance (the daemon
creates a tick's runs before the next tick), so it also holds after a tag was deleted and re-created.

Retries are the sensor's own, not Dagster's run retries (``dagster/max_retries`` + the instance's
``run_retries``): those need a setting in every instance (embedded sqlite and the Helm values) and the
daemon's retry loop, and they re-execute a run as it was, even when its tag has since moved. The sensor
instead watches the newest run of each run key it asked for (re-executions and Dagster retries keep the
run key tag, so a successful manual re-execution counts as a success). When that run failed, it asks again
with the next run key, up to ``max_retries`` times (default :data:`MAX_RETRIES`) per tag and commit; then it
logs that it gave up until the tag moves. A cancelled run is someone's decision and is not retried.

The cursor is
``{"tags": {tag: commit requested}, "malformed": [...], "watch": {tag: {"run_key", "attempt"}}}``
(``watch``: runs not yet seen to succeed, fail for good or be cancelled). A cursor of the earlier format
(no ``watch``) is read as one first run ``<tag>@<commit>`` per tag, so a run that failed before the upgrade
is retried too. Deleted and malformed tags are reported in the tick's log and skip reason; they never fail
the tick. A registry that cannot be listed (unreachable, black-holed, asks for credentials) fails the tick
with the RegistryError: Dagster shows the failed tick and its message, keeps the cursor, and tries again
on the next tick, where a skip would read as "nothing new".
"""


import json

import dagster as dg
from dagster import AutomationCondition

from ocm_assets.families import Family
from ocm_assets.reuse import REUSE_TAG
from ocm_resources.env import sensor_interval_seconds
from ocm_resources.registry import DataRegistry

#: Run requests per registry-sensor tick (retries, moved and new tags together); the rest wait for later
#: ticks.
MAX_RUNS_PER_TICK = 5
#: Runs the sensor asks for again after a run of a tag@commit failed (so at most 1 + MAX_RETRIES runs).
MAX_RETRIES = 2

RUN_KEY_TAG = "dagster/run_key"  # set by the sensor daemon, kept by re-executions and run retries
SENSOR_NAME_TAG = "dagster/sensor_name"
_IN_FLIGHT = {
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.MANAGED,
    dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
}


def run_key_for(tag: str, commit: str, n: int) -> str:
    return f"{tag}@{commit}" if n == 1 else f"{tag}@{commit}#{n}"


def _key_number(run_key: str) -> int:
    _, _, n = run_key.rpartition("#")
    return int(n) if "#" in run_key and n.isdigit() else 1


def _load_cursor(raw: str | None) -> dict:
    cursor = {}
    if raw:
        try:
            cursor = json.loads(raw)
        except json.JSONDecodeError:
            cursor = {}
    cursor.setdefault("tags", {})
    cursor.setdefault("malformed", [])
    if "watch" not in cursor:  # earlier format: every known tag had one run, keyed <tag>@<commit>
        cursor["watch"] = {tag: {"run_key": run_key_for(tag, commit, 1), "attempt": 1}
                           for tag, commit in cursor["tags"].items()}
    return cursor


def _instance(context: dg.SensorEvaluationContext) -> dg.DagsterInstance | None:
    try:
        return context.instance
    except dg.DagsterInvariantViolationError:  # evaluated without an instance
        return None


def _newest_runs(instance: dg.DagsterInstance, sensor_name: str,
                 run_keys: list[str]) -> dict[str, dg.DagsterRun]:
    """The newest run (a re-execution or retry included) of each run key this sensor asked for."""
    if not run_keys:
        return {}
    runs = instance.get_runs(filters=dg.RunsFilter(tags={SENSOR_NAME_TAG: sensor_name,
                                                         RUN_KEY_TAG: run_keys}))
    newest: dict[str, dg.DagsterRun] = {}
    for run in runs:  # newest first
        newest.setdefault(run.tags[RUN_KEY_TAG], run)
    return newest


def _used_key_numbers(instance: dg.DagsterInstance, sensor_name: str,
                      tags: list[str]) -> dict[tuple[str, str], int]:
    """(tag, commit) → the highest run-key number this sensor has used for it."""
    if not tags:
        return {}
    runs = instance.get_runs(filters=dg.RunsFilter(tags={SENSOR_NAME_TAG: sensor_name,
                                                         "ocm/registry_tag": tags}))
    used: dict[tuple[str, str], int] = {}
    for run in runs:
        key = run.tags.get(RUN_KEY_TAG)
        tag, commit = run.tags.get("ocm/registry_tag"), run.tags.get("ocm/registry_commit")
        if key and tag and commit:
            used[(tag, commit)] = max(used.get((tag, commit), 0), _key_number(key))
    return used


def build_registry_sensor(
    fam: Family, job, max_runs_per_tick: int = MAX_RUNS_PER_TICK, max_retries: int = MAX_RETRIES
) -> dg.SensorDefinition:
    if max_runs_per_tick < 1 or max_retries < 0:
        raise dg.DagsterInvalidDefinitionError(
            f"registry sensor of {fam.name}: max_runs_per_tick must be >= 1 and max_retries >= 0, "
            f"got {max_runs_per_tick} and {max_retries}"
        )

    @dg.sensor(
        name=fam.sensor_name,
        job=job,
        minimum_interval_seconds=sensor_interval_seconds(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Watches the registry for `{fam.dataset}-v<semver>` tags; each new or moved tag "
        f"becomes a partition of {fam.partitions_name} and a run of {job.name} (at most {max_runs_per_tick} "
        f"per tick; a failed run is asked for again up to {max_retries} times).",
    )
    def registry_sensor(context: dg.SensorEvaluationContext, registry: DataRegistry) -> dg.SensorResult:
        cursor = _load_cursor(context.cursor)
        known: dict[str, str] = cursor["tags"]
        scan = registry.scan(fam.dataset)
        current = {v.tag: v.commit for v in scan.versions}  # oldest semver first
        order = {tag: i for i, tag in enumerate(current)}
        instance = _instance(context)

        # The runs asked for earlier: still going, done, or failed (then retried while retries are left).
        watch: dict[str, dict] = {}
        retries: list[str] = []
        gave_up: list[str] = []
        watched = {tag: w for tag, w in cursor["watch"].items()
                   if tag in current and current[tag] == known.get(tag)}
        newest = (
            _newest_runs(instance, fam.sensor_name, [w["run_key"] for w in watched.values()])
            if instance else {}
        )
        for tag, w in watched.items():
            run = newest.get(w["run_key"])
            if instance is None or (run is not None and run.status in _IN_FLIGHT):
                watch[tag] = w
            elif run is None:
                pass  # no run with that key (the daemon never created it, or the run was deleted)
            elif run.status == dg.DagsterRunStatus.FAILURE:
                if w["attempt"] <= max_retries:
                    retries.append(tag)
                    watch[tag] = w  # until the retry is asked for (it may wait for a later tick)
                else:
                    gave_up.append(w["run_key"])
                    context.log.warning(
                        f"{w['run_key']}: run {run.run_id} failed; {tag} at {current[tag][:10]} has now "
                        f"failed {w['attempt']} time(s), so the sensor gives up until the tag moves "
                        "(re-execute by hand)"
                    )
            elif run.status == dg.DagsterRunStatus.CANCELED:
                context.log.info(f"{w['run_key']}: run {run.run_id} was cancelled; not retried")

        new_tags = [tag for tag in current if tag not in known]
        moved = [tag for tag in current if tag in known and known[tag] != current[tag]]
        deleted = sorted(set(known) - set(current))
        new_malformed = sorted(set(scan.malformed) - set(cursor["malformed"]))

        wanted = [*sorted(retries, key=order.__getitem__), *moved, *new_tags]
        chosen, waiting = wanted[:max_runs_per_tick], wanted[max_runs_per_tick:]
        used = _used_key_numbers(instance, fam.sensor_name, chosen) if instance else {}

        run_requests = []
        tags_next = {tag: commit for tag, commit in known.items() if tag in current}
        for tag in chosen:
            commit = current[tag]
            if tag in retries:
                previous = watch[tag]
                n = max(used.get((tag, commit), 0), _key_number(previous["run_key"])) + 1
                attempt, trigger = previous["attempt"] + 1, "retry"
                context.log.info(f"{previous['run_key']} failed: asking again as attempt {attempt}")
            else:
                n = used.get((tag, commit), 0) + 1
                attempt, trigger = 1, "new" if tag in new_tags else "moved"
            key = run_key_for(tag, commit, n)
            run_requests.append(dg.RunRequest(
                run_key=key,
                partition_key=tag,
                tags={"ocm/registry_tag": tag, "ocm/registry_commit": commit, "ocm/trigger": trigger,
                      "ocm/attempt": str(attempt)},
            ))
            tags_next[tag] = commit
            watch[tag] = {"run_key": key, "attempt": attempt}
        for tag in moved:
            context.log.info(f"tag {tag} moved {known[tag][:10]} -> {current[tag][:10]}"
                             + (": requesting a new run" if tag in chosen
                                else ": run requested on a later tick"))
        if waiting:
            context.log.info(f"{len(waiting)} more run(s) wait for later ticks (at most "
                             f"{max_runs_per_tick} per tick), starting with {waiting[0]}")
        for tag in deleted:
            context.log.warning(f"tag {tag} was deleted from the registry; its partition and history "
                                "are kept")
        for tag in new_malformed:
            context.log.warning(
                f"tag {tag!r} starts with {fam.dataset}- but is not "
                "<dataset>-v<major>.<minor>.<patch>; ignored"
            )

        # Every tag that gets a run needs its partition: new tags, and tags whose partition someone deleted.
        partitions = [r.partition_key for r in run_requests]
        if instance is not None:
            existing = set(instance.get_dynamic_partitions(fam.partitions_name))
            to_add = [tag for tag in partitions if tag not in existing]
        else:
            to_add = [tag for tag in partitions if tag in new_tags]

        skip_reason = None
        if not run_requests:
            notes = [f"{len(current)} versions of {fam.dataset}, none new or moved"]
            if watch:
                notes.append(f"{len(watch)} run(s) still queued or running")
            if gave_up:
                notes.append(f"failed {max_retries + 1} times, not asked again: {', '.join(gave_up)}")
            if deleted:
                notes.append(f"deleted: {', '.join(deleted)}")
            if scan.malformed:
                notes.append(f"malformed tags ignored: {', '.join(scan.malformed)}")
            skip_reason = dg.SkipReason("; ".join(notes))
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [dg.AddDynamicPartitionsRequest(fam.partitions_name, to_add)] if to_add else []
            ),
            skip_reason=skip_reason,
            cursor=json.dumps({"tags": tags_next, "malformed": list(scan.malformed), "watch": watch},
                              sort_keys=True),
        )

    return registry_sensor


# -- declarative automation downstream of the dataset ----------------------------------------------------

def training_condition() -> dg.AutomationCondition:
    """Partitioned steps after the dataset (preprocessing, hpo, model, evaluation): Dagster's ``eager()``
    (a new partition, or a dependency updated in another run; nothing missing or in progress upstream),
    and only while every blocking check of the dependencies passed. A failed ``schema`` check leaves the
    dataset materialized but stops everything below it, with no code of ocm's."""
    return (AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()).with_label(
        "eager_after_blocking_checks")


def rollout_condition() -> dg.AutomationCondition:
    """The champion (one per family) after an evaluation partition. Not ``eager()``: that also fires when
    the evaluation *will be requested* on the same tick, and the champion, unpartitioned, would then run in
    a run of its own beside the evaluation it is meant to judge. This waits for the evaluation to be
    materialized (by any run), for no evaluation to be in progress, and for blocking checks upstream."""
    evaluated = AutomationCondition.any_deps_match(AutomationCondition.newly_updated()).with_label(
        "an_evaluation_updated")
    return (
        evaluated.since_last_handled()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        & AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("after_an_evaluation")


def endpoint_condition() -> dg.AutomationCondition:
    """The endpoint after the champion: ``eager()``, so both land in the same run of the same tick."""
    return AutomationCondition.eager()


def build_automation_sensors(
    fam: Family, training: list[dg.AssetKey], rollout: list[dg.AssetKey]
) -> list[dg.AutomationConditionSensorDefinition]:
    """The daemon's evaluators of the conditions above, RUNNING by default. Two per family, for their run
    tags: runs of the rollout part (evaluation, champion, endpoint) carry ``ocm/rollout=<family>``, which
    the instance's run queue limits to one at a time per family (``ocm_resources.env``); training runs
    carry only ``ocm/family`` and may run beside a rollout."""
    from ocm_resources.env import ROLLOUT_TAG

    return [
        dg.AutomationConditionSensorDefinition(
            f"{fam.name}_training_automation",
            target=dg.AssetSelection.assets(*training),
            run_tags={"ocm/family": fam.name},
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=sensor_interval_seconds(),
            description=f"Evaluates the automation conditions of {fam.name}'s preprocessing and training: "
            "each runs once its dataset partition is new or updated and its blocking checks passed.",
        ),
        dg.AutomationConditionSensorDefinition(
            f"{fam.name}_rollout_automation",
            target=dg.AssetSelection.assets(*rollout),
            run_tags={"ocm/family": fam.name, ROLLOUT_TAG: fam.name},
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=sensor_interval_seconds(),
            description=f"Evaluates the automation conditions of {fam.name}'s evaluation, champion gate and "
            f"endpoint; its runs carry {ROLLOUT_TAG}={fam.name} (one rollout of the family at a time).",
        ),
    ]


def build_retrain_schedule(fam: Family, job) -> dg.ScheduleDefinition:
    """Scheduled retraining (``fam.retrain_cron``) of the family's newest registry version.

    STOPPED by default: turn it on in the UI (Automation) or with ``dagster schedule start``. Each tick asks
    for one run of the retrain job on the newest tag, tagged ``ocm/reuse=off`` (it trains even when a model of
    the same data, code and config exists); the automation conditions then run the evaluation, the gate and
    the endpoint, so a retrain that is no better than the champion changes nothing.
    """

    @dg.schedule(
        name=fam.schedule_name,
        job=job,
        cron_schedule=fam.retrain_cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Retrains the newest {fam.dataset} version on `{fam.retrain_cron}` (off by default).",
    )
    def retrain_schedule(context: dg.ScheduleEvaluationContext, registry: DataRegistry):
        versions = registry.list_versions(fam.dataset)
        if not versions:
            return dg.SkipReason(f"no {fam.dataset}-v<semver> tags in the registry yet: nothing to retrain")
        newest = max(versions, key=lambda v: v.semver)
        at = context.scheduled_execution_time
        stamp = at.isoformat() if at is not None else "now"
        if context.instance is not None:
            # The registry sensor normally adds the partition; a schedule turned on first must not fail.
            try:
                if not context.instance.has_dynamic_partition(fam.partitions_name, newest.tag):
                    context.instance.add_dynamic_partitions(fam.partitions_name, [newest.tag])
            except dg.DagsterInvariantViolationError:
                pass
        return dg.RunRequest(
            run_key=f"{newest.tag}@{newest.commit}@{stamp}",
            partition_key=newest.tag,
            # a scheduled retrain trains, even on data, code and config an earlier model was trained with
            tags={"ocm/registry_tag": newest.tag, "ocm/registry_commit": newest.commit,
                  "ocm/trigger": "schedule", REUSE_TAG: "off"},
        )

    return retrain_schedule

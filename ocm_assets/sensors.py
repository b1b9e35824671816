"""Per-family sensors on the data registry: a new tag becomes a partition and a retraining run; and an
optional cron schedule that retrains the newest version (off until someone turns it on).

The cursor is ``{"tags": {tag: commit}, "malformed": [...]}``. A run request's ``run_key`` is
``<tag>@<commit>``, so a moved tag (same name, new commit) asks for a new run and a re-tick asks for none.
Deleted and malformed tags are reported in the tick's log and skip reason; they never fail the tick.
"""


import json

import dagster as dg

from ocm_assets.families import Family
from ocm_resources.registry import DataRegistry

SENSOR_INTERVAL_SECONDS = 30


def _load_cursor(raw: str | None) -> dict:
    if not raw:
        return {"tags": {}, "malformed": []}
    try:
        cursor = json.loads(raw)
    except json.JSONDecodeError:
        return {"tags": {}, "malformed": []}
    cursor.setdefault("tags", {})
    cursor.setdefault("malformed", [])
    return cursor


def build_registry_sensor(fam: Family, job) -> dg.SensorDefinition:
    @dg.sensor(
        name=fam.sensor_name,
        job=job,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Watches the registry for `{fam.dataset}-v<semver>` tags; each new or moved tag "
        f"becomes a partition of {fam.partitions_name} and a run of {job.name}.",
    )
    def registry_sensor(context: dg.SensorEvaluationContext, registry: DataRegistry) -> dg.SensorResult:
        cursor = _load_cursor(context.cursor)
        known: dict[str, str] = cursor["tags"]
        scan = registry.scan(fam.dataset)
        current = {v.tag: v.commit for v in scan.versions}

        new_tags = [tag for tag in current if tag not in known]
        moved = [tag for tag in current if tag in known and known[tag] != current[tag]]
        deleted = sorted(set(known) - set(current))
        new_malformed = sorted(set(scan.malformed) - set(cursor["malformed"]))

        run_requests = [
            dg.RunRequest(
                run_key=f"{tag}@{current[tag]}",
                partition_key=tag,
                tags={"ocm/registry_tag": tag, "ocm/registry_commit": current[tag], "ocm/trigger": "new" if tag in new_tags else "moved"},
            )
            for tag in [*new_tags, *moved]
        ]
        for tag in moved:
            context.log.info(f"tag {tag} moved {known[tag][:10]} -> {current[tag][:10]}: requesting a new run")
        for tag in deleted:
            context.log.warning(f"tag {tag} was deleted from the registry; its partition and history are kept")
        for tag in new_malformed:
            context.log.warning(
                f"tag {tag!r} starts with {fam.dataset}- but is not <dataset>-v<major>.<minor>.<patch>; ignored"
            )

        # Every tag that gets a run needs its partition: new tags, and tags whose partition someone deleted.
        wanted = [r.partition_key for r in run_requests]
        try:
            existing = set(context.instance.get_dynamic_partitions(fam.partitions_name))
            to_add = [tag for tag in wanted if tag not in existing]
        except dg.DagsterInvariantViolationError:  # evaluated without an instance
            to_add = new_tags

        skip_reason = None
        if not run_requests:
            notes = [f"{len(current)} versions of {fam.dataset}, none new or moved"]
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
            cursor=json.dumps({"tags": current, "malformed": list(scan.malformed)}, sort_keys=True),
        )

    return registry_sensor


def build_rollout_sensor(fam: Family, retrain_job, rollout_job) -> dg.RunStatusSensorDefinition:
    """When a retrain run of the family succeeds, ask for the rollout (champion gate, then endpoint)."""

    @dg.run_status_sensor(
        name=f"{fam.name}_rollout_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[retrain_job],
        request_job=rollout_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"After a successful {retrain_job.name} run: run {rollout_job.name} for the same partition "
        "(evaluation against the champion, the gate, then the endpoint rolls over when the challenger passes).",
    )
    def rollout_sensor(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        partition = run.tags.get("dagster/partition")
        if not partition:
            return dg.SkipReason(f"run {run.run_id} has no partition: a rollout judges one data version's model")
        return dg.RunRequest(
            run_key=f"rollout-after-{run.run_id}",
            partition_key=partition,
            tags={"ocm/after_run": run.run_id, "ocm/registry_tag": partition},
        )

    return rollout_sensor


def build_retrain_schedule(fam: Family, job) -> dg.ScheduleDefinition:
    """Scheduled retraining (``fam.retrain_cron``) of the family's newest registry version.

    STOPPED by default: turn it on in the UI (Automation) or with ``dagster schedule start``. Each tick asks
    for one run of the retrain job on the newest tag; the rollout sensor then runs the gate and the endpoint
    as after a sensor-triggered run, so a retrain that is no better than the champion changes nothing.
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
            tags={"ocm/registry_tag": newest.tag, "ocm/registry_commit": newest.commit, "ocm/trigger": "schedule"},
        )

    return retrain_schedule

"""After deploy: ``<family>/served_traffic`` (hourly partitions of the endpoint's prediction log) and its
checks, the drift-retrain sensor and the alert sensor.

- ``served_traffic`` reads one hour of the replicas' parquet log (:mod:`ocm_ml.serve.prediction_log`) and
  checks it: ``input_drift`` (PSI and KS per input summary feature against the training split of the data
  version that served it), ``prediction_drift`` (served class shares against the holdout's labels) and
  ``confidence_collapse``. Thresholds are run config; each check carries its figures and a plot, and a
  failed one sends an alert (``WebhookAlerts``, off by default).
- ``<family>_drift_retrain_sensor``: a failed drift check whose run had ``retrain_on_drift: true`` asks for
  one run of ``<family>_retrain`` on the newest registry version (run key per drifted materialization),
  which then goes through evaluation, the gate and the canary like any other.
- ``<family>_alert_sensor``: a gate that kept the champion (``champion:promoted`` failed) and a failed
  endpoint step (the endpoint restored the champion) each send one alert.
"""

import base64
from datetime import datetime
from typing import Any

import dagster as dg
from pydantic import Field

from ocm_assets.families import Family
from ocm_ml.contract import DatasetMetadata
from ocm_resources.alerts import WebhookAlerts
from ocm_resources.prediction_logs import PredictionLogStore
from ocm_resources.registry import DataRegistry, RegistryVersion

#: Hourly partitions (UTC) of the served traffic; the log's folders are ``date=YYYY-MM-DD/hour=HH``.
#: The running hour is a partition too (``end_offset=1``): it can be checked while traffic arrives, and
#: materialized again later; the schedule checks each hour once it is over.
HOURLY = dg.HourlyPartitionsDefinition(start_date="2026-11-01-00:00", timezone="UTC", end_offset=1)
DRIFT_CHECKS = ("input_drift", "prediction_drift")
CHECKS = (*DRIFT_CHECKS, "confidence_collapse")


def served_traffic_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "served_traffic"])


class ServedTrafficConfig(dg.Config):
    psi_threshold: float = Field(default=0.25,
                                 description="Input drift: PSI above this on any summary feature.")
    ks_threshold: float = Field(default=0.3,
                                description="Input drift: KS statistic above this on any feature.")
    prediction_psi_threshold: float = Field(
        default=0.25, description="Prediction drift: PSI of served class shares vs holdout.")
    min_mean_confidence: float = Field(default=0.5,
                                       description="Confidence collapse: mean confidence below this.")
    low_confidence: float = Field(default=0.5,
                                  description="Confidence collapse: what counts as a low confidence.")
    max_low_confidence_share: float = Field(
        default=0.5, description="Confidence collapse: share of low-confidence answers above this.")
    min_rows: int = Field(default=30,
                          description="Fewer served rows than this: too little to judge (checks pass).")
    reference_rows: int = Field(default=2000,
                                description="Training rows the reference summaries are computed on.")
    retrain_on_drift: bool = Field(
        default=False, description="A failed drift check asks for one retrain of the newest registry version "
        "(through evaluation, gate and canary), by the drift-retrain sensor.")

    def thresholds(self):
        from ocm_ml.drift import DriftThresholds

        try:
            return DriftThresholds(psi=self.psi_threshold, ks=self.ks_threshold,
                                   prediction_psi=self.prediction_psi_threshold,
                                   min_mean_confidence=self.min_mean_confidence,
                                   low_confidence=self.low_confidence,
                                   max_low_confidence_share=self.max_low_confidence_share,
                                   min_rows=self.min_rows)
        except ValueError as exc:
            raise dg.Failure(f"served_traffic config: {exc}") from None


def _png_md(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _version_of(tag: str, commit: str) -> RegistryVersion:
    from ocm_ml.contract import TAG_RE

    match = TAG_RE.match(tag or "")
    if not match:
        raise dg.Failure(f"the served rows name data version {tag!r}, which is not a registry tag")
    return RegistryVersion(match["dataset"], match["version"], tag, commit)


def _sample_rows(registry: DataRegistry, version: RegistryVersion, path: str, rows: int):
    """Up to ``rows`` rows of ``path`` at ``version``, every k-th row (a split may be stored in label
    order)."""
    with registry.parquet(version, path) as parquet:
        table = parquet.read()
    step = max(1, table.num_rows // max(rows, 1))
    return table.take(list(range(0, table.num_rows, step))[:rows])


def reference_summaries(fam: Family, registry: DataRegistry, version: RegistryVersion, rows: int):
    """The input summaries of the training split the served model learned from."""
    import numpy as np

    from ocm_ml.drift import summarize_images, summarize_texts

    table = _sample_rows(registry, version, f"{version.dataset}/train.parquet", rows)
    if fam.kind == "image":
        column = table.column("image").combine_chunks()
        if hasattr(column, "flatten"):
            pixels = np.asarray(column.flatten(), dtype=np.float32).reshape(table.num_rows, -1)
        else:  # binary images
            pixels = np.stack([np.frombuffer(b, dtype=np.uint8)
                               for b in column.to_pylist()]).astype(np.float32)
        return summarize_images(pixels)
    return summarize_texts(table.column("text").to_pylist())


def served_summaries(fam: Family, table) -> dict[str, Any]:
    import numpy as np

    from ocm_ml.drift import HIST_BINS

    if fam.kind == "image":
        out = {"pixel_mean": np.asarray(table.column("pixel_mean").to_numpy(zero_copy_only=False),
                                        dtype=np.float64),
               "pixel_std": np.asarray(table.column("pixel_std").to_numpy(zero_copy_only=False),
                                       dtype=np.float64)}
        hist = np.asarray(table.column("hist").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                          dtype=np.float64).reshape(table.num_rows, HIST_BINS)
        for i in range(HIST_BINS):
            out[f"hist_{i:02d}"] = hist[:, i]
        return out
    return {name: np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
            for name in ("text_length", "token_count", "oov_share") if name in table.column_names}


def holdout_labels(fam: Family, registry: DataRegistry, metadata: DatasetMetadata) -> list[str] | None:
    """The holdout's labels as the served log names them: class ids (images) or label names (texts)."""
    from ocm_ml.contract import holdout_path

    version = registry.holdout(fam.dataset)
    if version is None:
        return None
    with registry.parquet(version, holdout_path(fam.dataset)) as parquet:
        labels = parquet.read(columns=["label"]).column("label").to_pylist()
    if fam.kind == "image":
        return [str(int(x)) for x in labels]
    label_map = metadata.label_map or {}
    return [str(label_map.get(str(x), x)) for x in labels]


def build_served_traffic_asset(fam: Family) -> dg.AssetsDefinition:
    key = served_traffic_key(fam)
    specs = [
        dg.AssetCheckSpec("input_drift", asset=key,
                          description="PSI/KS of every input summary feature against the training split of "
                          "the served model's data version (thresholds in run config)"),
        dg.AssetCheckSpec("prediction_drift", asset=key,
                          description="PSI of the served class shares against the holdout's labels"),
        dg.AssetCheckSpec("confidence_collapse", asset=key,
                          description="Mean confidence and the share of low-confidence answers"),
    ]

    @dg.asset(
        key=key,
        group_name=fam.name,
        partitions_def=HOURLY,
        check_specs=specs,
        description=f"One hour of what `/{fam.name}` served (the replicas' prediction log: model and data "
        "version, request id, input summary, prediction, confidence), checked for input drift, prediction "
        "drift and confidence collapse. With `retrain_on_drift`, a drift failure asks for one retrain of the "
        "newest version.",
        kinds={"parquet"},
        tags={"ocm/family": fam.name},
    )
    def served_traffic(context: dg.AssetExecutionContext, config: ServedTrafficConfig,
                       prediction_logs: PredictionLogStore, registry: DataRegistry, alerts: WebhookAlerts):
        from collections import Counter

        from ocm_ml.drift import confidence_collapse, input_drift, prediction_drift
        from ocm_ml.serve.prediction_log import read_log

        thresholds = config.thresholds()
        window = context.partition_time_window
        table = read_log(prediction_logs.base_path(), fam.name, window.start, window.end,
                         filesystem=prediction_logs.filesystem())
        partition = context.partition_key
        if table.num_rows == 0:
            context.log.info(f"no prediction-log rows for {fam.name} in {partition}")
            yield dg.MaterializeResult(metadata={"rows": 0, "window_start": str(window.start)})
            for name in CHECKS:
                yield dg.AssetCheckResult(check_name=name, passed=True,
                                          description="no served traffic in this hour",
                                          metadata={"rows": 0})
            return
        served_by = Counter(zip(table.column("model_version").to_pylist(),
                                table.column("data_version").to_pylist(),
                                table.column("dvc_commit").to_pylist(), strict=True))
        (model_version, data_version, commit), _ = served_by.most_common(1)[0]
        version = _version_of(data_version, commit)
        metadata = registry.read_metadata(version)
        reference = reference_summaries(fam, registry, version, config.reference_rows)
        confidences = table.column("confidence").to_pylist()
        served = (table.column("class_id").to_pylist() if fam.kind == "image"
                  else table.column("prediction").to_pylist())
        served = [str(x) for x in served]

        inputs = input_drift(reference, served_summaries(fam, table), thresholds)
        labels = holdout_labels(fam, registry, metadata)
        predictions = prediction_drift(labels, served, thresholds) if labels else None
        confidence = confidence_collapse(confidences, thresholds)
        title = f"{fam.name} {partition}"
        common = {"retrain_on_drift": config.retrain_on_drift, "served_model_version": str(model_version),
                  "reference_data_version": data_version, "rows": table.num_rows}

        yield dg.MaterializeResult(metadata={
            "rows": table.num_rows,
            "requests": len(set(table.column("request_id").to_pylist())),
            "served_by": dg.MetadataValue.json({f"v{v} ({d})": n for (v, d, _), n in served_by.items()}),
            "reference_data_version": data_version,
            "reference_commit": commit,
            "mean_confidence": confidence["mean_confidence"],
            "window_start": str(window.start),
        })

        from ocm_ml.plots import confidence_png, input_drift_png, prediction_drift_png

        results = {
            "input_drift": (inputs["passed"], dict(
                common, max_psi=inputs["max_psi"], max_ks=inputs["max_ks"],
                drifted=dg.MetadataValue.json(inputs["drifted"]),
                features=dg.MetadataValue.json(inputs["features"]),
                thresholds=dg.MetadataValue.json({"psi": thresholds.psi, "ks": thresholds.ks}),
                plot=_png_md(input_drift_png(inputs, thresholds.psi, f"input drift, {title}"),
                             "PSI per feature")),
                f"drifted: {', '.join(inputs['drifted'])}" if inputs["drifted"] else
                f"max PSI {inputs['max_psi']}, max KS {inputs['max_ks']}"
                + ("" if inputs["enough_rows"] else f" (only {inputs['rows']} rows: not judged)")),
            "confidence_collapse": (confidence["passed"], dict(
                common, **{k: v for k, v in confidence.items() if k not in ("passed",) and v is not None},
                plot=_png_md(confidence_png(confidences, thresholds.low_confidence, f"confidence, {title}"),
                             "confidence histogram")),
                f"mean confidence {confidence['mean_confidence']}, "
                f"low share {confidence['low_confidence_share']}"),
        }
        if predictions is None:
            results["prediction_drift"] = (True, dict(common),
                                           "no holdout in the registry: nothing to compare with")
        else:
            results["prediction_drift"] = (predictions["passed"], dict(
                common, psi=predictions["psi"], total_variation=predictions["total_variation"],
                reference_shares=dg.MetadataValue.json(predictions["reference_shares"]),
                served_shares=dg.MetadataValue.json(predictions["served_shares"]),
                plot=_png_md(prediction_drift_png(predictions, f"predictions vs holdout, {title}"),
                             "class shares")),
                f"PSI {predictions['psi']} (threshold {thresholds.prediction_psi})")
        for name in CHECKS:
            passed, meta, description = results[name]
            if not passed:
                context.log.warning(f"{name} failed for {fam.name} {partition}: {description}")
                alerts.notify("drift", f"{fam.name}: {name} failed ({partition})", description,
                              {"served model": f"v{model_version}", "data version": data_version,
                               "rows": table.num_rows, "retrain requested": config.retrain_on_drift},
                              log=context.log)
            yield dg.AssetCheckResult(check_name=name, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                                      description=description, metadata=meta)

    return served_traffic


# --- sensors ---------------------------------------------------------------------------------------------


def newest_partition(instance: dg.DagsterInstance, fam: Family) -> str | None:
    from ocm_ml.contract import TAG_RE

    keys = [k for k in instance.get_dynamic_partitions(fam.partitions_name) if TAG_RE.match(k)]

    def semver(key: str) -> tuple[int, ...]:
        match = TAG_RE.match(key)
        assert match is not None  # keys holds only the keys TAG_RE matches
        return tuple(int(p) for p in match["version"].split("."))

    return max(keys, key=semver) if keys else None


def _cursor(raw: str | None) -> dict[str, Any]:
    import json

    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {}


def build_drift_retrain_sensor(fam: Family, retrain_job) -> dg.SensorDefinition:
    check_keys = [dg.AssetCheckKey(served_traffic_key(fam), name) for name in DRIFT_CHECKS]

    @dg.sensor(name=f"{fam.name}_drift_retrain_sensor", job=retrain_job, minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"A failed drift check of {fam.name}/served_traffic that ran with "
               f"retrain_on_drift asks for one {fam.retrain_job_name} run of the newest registry version.")
    def drift_retrain(context: dg.SensorEvaluationContext):
        import json

        from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

        cursor = _cursor(context.cursor)
        seen = cursor.get("id", 0)
        storage = context.instance.event_log_storage
        failed = []
        for check_key in check_keys:
            for record in storage.get_asset_check_execution_history(
                    check_key, limit=50, status={AssetCheckExecutionRecordStatus.FAILED}):
                if record.id > seen:
                    failed.append(record)
        newest_id = max([seen, *(r.id for r in failed)])
        wanted = {}
        for record in sorted(failed, key=lambda r: r.id):
            evaluation = record.evaluation
            meta = evaluation.metadata if evaluation is not None else {}
            flag = meta.get("retrain_on_drift")
            if flag is not None and getattr(flag, "value", flag) is True:
                wanted.setdefault(record.run_id, record)  # both drift checks of one run: one retrain
        partition = newest_partition(context.instance, fam)
        context.update_cursor(json.dumps({"id": newest_id}))
        if not wanted:
            return dg.SkipReason("no failed drift check with retrain_on_drift since the last tick")
        if partition is None:
            return dg.SkipReason(f"drift asks for a retrain, but {fam.name} has no registry version "
                                 "(partition)")
        requests = []
        for run_id, record in wanted.items():
            requests.append(dg.RunRequest(
                # one retrain per registry version and drifted hour, however often that hour is checked again
                run_key=f"drift:{partition}:{record.partition or run_id}", partition_key=partition,
                tags={"ocm/family": fam.name, "ocm/trigger": "drift", "ocm/drift_run": run_id,
                      "ocm/drift_check": record.key.name,
                      "ocm/drift_partition": record.partition or ""}))
        return requests

    return drift_retrain


def _endpoint_failures(instance: dg.DagsterInstance, fam: Family, since: float):
    """(run id, STEP_FAILURE entry, update time) of the runs that failed since ``since`` (a timestamp) in the
    endpoint step: after the gate, that step fails only once it has restored the served champion
    (``ocm_assets.serving``). Through run records, so it works on run-sharded (sqlite) event logs too."""
    from datetime import UTC

    from dagster._core.events import DagsterEventType

    step = f"{fam.name}__endpoint"
    out = []
    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE],
                                                     updated_after=datetime.fromtimestamp(since, tz=UTC)),
                                       limit=100, ascending=True)
    for record in records:
        for entry in instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.STEP_FAILURE):
            if entry.step_key == step:
                out.append((record.dagster_run.run_id, entry, record.update_timestamp.timestamp()))
                break
    return out


def _failure_text(entry) -> str:
    data = entry.dagster_event.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    if data.error is not None:
        return data.error.message.strip()
    return "the endpoint step failed"


def build_alert_sensor(fam: Family) -> dg.SensorDefinition:
    from ocm_assets.serving import champion_key

    promoted = dg.AssetCheckKey(champion_key(fam), "promoted")

    @dg.sensor(name=f"{fam.name}_alert_sensor", minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Sends a webhook alert (WebhookAlerts; off unless OCM_ALERT_WEBHOOK_URL is set) "
               f"when {fam.name}'s gate keeps the champion or its endpoint step fails and restores the "
               "champion.")
    def alert_sensor(context: dg.SensorEvaluationContext, alerts: WebhookAlerts):
        import json

        from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

        cursor = _cursor(context.cursor)
        instance = context.instance
        first_tick = not cursor  # start from now: no alerts for what happened before the sensor ran
        sent = 0
        gate_failures = sorted(instance.event_log_storage.get_asset_check_execution_history(
            promoted, limit=20, status={AssetCheckExecutionRecordStatus.FAILED}), key=lambda r: r.id)
        gate_seen = cursor.get("gate", 0)
        for record in gate_failures:
            if record.id <= gate_seen:
                continue
            gate_seen = record.id
            if first_tick:
                continue
            evaluation = record.evaluation
            sent += alerts.notify("gate_failed", f"{fam.name}: the gate kept the champion",
                                  (evaluation.description if evaluation else None)
                                  or "the challenger did not pass",
                                  {"run": record.run_id}, log=context.log)
        import time

        since = time.time() if first_tick else float(cursor.get("endpoint_since", 0.0))
        alerted = list(cursor.get("endpoint_runs", []))
        for run_id, entry, updated in [] if first_tick else _endpoint_failures(instance, fam, since - 1.0):
            since = max(since, updated)
            if run_id in alerted:
                continue
            alerted = [*alerted, run_id][-50:]
            sent += alerts.notify("rollback", f"{fam.name}: endpoint rollout failed, champion restored",
                                  _failure_text(entry), {"run": run_id}, log=context.log)
        context.update_cursor(json.dumps({"gate": gate_seen, "endpoint_since": since,
                                          "endpoint_runs": alerted}))
        return dg.SkipReason(f"{sent} alert(s) sent" if alerts.enabled else "alerts are off (no webhook URL)")

    return alert_sensor


def build_monitoring(fam: Family, retrain_job, retrain_on_drift: bool = False):
    """``served_traffic``, its sensors, its job and the hourly schedule: (assets, sensors, jobs, schedules).
    ``retrain_on_drift``: the schedule's runs ask for a retrain when a drift check fails."""
    asset = build_served_traffic_asset(fam)
    sensors = [build_drift_retrain_sensor(fam, retrain_job), build_alert_sensor(fam)]
    return [asset], sensors, [served_traffic_job(fam)], [build_hourly_check_schedule(fam, retrain_on_drift)]


def served_traffic_job(fam: Family):
    return dg.define_asset_job(f"{fam.name}_served_traffic", selection=dg.AssetSelection.assets(
        served_traffic_key(fam)), partitions_def=HOURLY, tags={"ocm/family": fam.name},
        description=f"Check one hour of {fam.name}'s served traffic (drift, confidence).")


def build_hourly_check_schedule(fam: Family, retrain_on_drift: bool = False) -> dg.ScheduleDefinition:
    @dg.schedule(name=f"{fam.name}_served_traffic_hourly", cron_schedule="10 * * * *",
                 execution_timezone="UTC",
                 job_name=f"{fam.name}_served_traffic", default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Ten minutes past each hour: check the hour before of "
                 f"{fam.name}'s served traffic.")
    def hourly(context: dg.ScheduleEvaluationContext):
        from datetime import timedelta

        when = context.scheduled_execution_time - timedelta(hours=1)
        key = HOURLY.get_partition_key_for_timestamp(when.timestamp())
        config = {"ops": {f"{fam.name}__served_traffic": {"config": {"retrain_on_drift": True}}}}
        return dg.RunRequest(run_key=key, partition_key=key, run_config=config if retrain_on_drift else None)

    return hourly


def window_of(partition: str) -> tuple[datetime, datetime]:
    """The hour a served_traffic partition key (``YYYY-MM-DD-HH:00``) covers."""
    window = HOURLY.time_window_for_partition_key(partition)
    return window.start, window.end

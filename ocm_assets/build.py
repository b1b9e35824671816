"""Builds the code location from the family table.

Per family: the assets, the jobs (``<family>_ingest``: the dataset, what the registry sensor asks for;
``<family>_retrain`` and ``<family>_rollout`` for runs by hand, the demo and the schedule), the registry
sensor, the schedule, and the automation conditions of every asset below the dataset with the two sensors
that evaluate them (``ocm_assets.sensors``). The conditions are applied here, once, so the asset factories
stay free of scheduling policy.
"""

from __future__ import annotations

import dagster as dg

from ocm_assets import data, monitoring, serving, text, training
from ocm_assets.evaluation import evaluation_key
from ocm_assets.families import FAMILIES, Family
from ocm_assets.sensors import (
    build_automation_sensors,
    build_registry_sensor,
    build_retrain_schedule,
    endpoint_condition,
    rollout_condition,
    training_condition,
)


def family_assets(fam: Family) -> list[dg.AssetsDefinition]:
    assets = [data.build_dataset_asset(fam), data.build_preprocessing_asset(fam)]
    if fam.kind == "image":
        assets.append(training.build_vision_model_asset(fam))
    else:
        assets += [text.build_hpo_asset(fam), text.build_text_model_asset(fam)]
    return assets


def retrain_job(fam: Family, assets: list[dg.AssetsDefinition]):
    partitioned = [key for a in assets if a.partitions_def is not None for key in a.keys]
    return dg.define_asset_job(
        fam.retrain_job_name,
        selection=dg.AssetSelection.assets(*partitioned),
        description=f"Validate, preprocess and retrain {fam.name} for one registry version (partition).",
        tags={"ocm/family": fam.name},
    )


def ingest_job(fam: Family):
    return dg.define_asset_job(
        f"{fam.name}_ingest",
        selection=dg.AssetSelection.assets(data.dataset_key(fam)),
        description=f"Resolve and validate one {fam.name} registry version (partition); what follows runs by "
        "its automation conditions.",
        tags={"ocm/family": fam.name},
    )


def automation_conditions(fam: Family) -> dict[dg.AssetKey, dg.AutomationCondition]:
    """Every asset below the dataset and its condition; the dataset itself is asked for by the registry sensor
    (a moved tag is invisible to conditions: only the sensor lists the registry)."""
    below = [data.preprocessing_key(fam), training.model_key(fam), evaluation_key(fam)]
    if fam.kind == "text":
        below.append(text.hpo_key(fam))
    return {
        **{key: training_condition() for key in below},
        serving.champion_key(fam): rollout_condition(),
        serving.endpoint_key(fam): endpoint_condition(),
    }


def with_conditions(assets: list[dg.AssetsDefinition], conditions: dict[dg.AssetKey, dg.AutomationCondition]):
    def apply(spec: dg.AssetSpec) -> dg.AssetSpec:
        condition = conditions.get(spec.key)
        return spec if condition is None else spec.replace_attributes(automation_condition=condition)

    return [a.map_asset_specs(apply) for a in assets]


def with_monitoring_defaults(resources: dict) -> dict:
    """Explicit resources (tests, other code locations) without the monitoring ones get them switched off:
    no prediction log, no alerts."""
    from ocm_resources.alerts import WebhookAlerts
    from ocm_resources.prediction_logs import PredictionLogStore

    return {"prediction_logs": PredictionLogStore(root=None), "alerts": WebhookAlerts(), **resources}


def is_training_step(asset: dg.AssetsDefinition) -> bool:
    """Steps that train (torch): they get the training pod size (and GPUs) under the k8s executor."""
    return any("pytorch" in spec.kinds for spec in asset.specs)


def build_definitions(resources: dict | None = None,
                      families: tuple[Family, ...] = FAMILIES) -> dg.Definitions:
    from ocm_resources.env import build_executor, build_resources, retrain_on_drift

    assets, jobs, sensors, schedules = [], [], [], []
    for fam in families:
        conditions = automation_conditions(fam)
        fam_assets = with_conditions(family_assets(fam), conditions)
        job, ingest = retrain_job(fam, fam_assets), ingest_job(fam)
        assets += fam_assets + with_conditions(serving.build_serving_assets(fam), conditions)
        jobs += [job, ingest, serving.rollout_job(fam)]
        rollout_keys = [evaluation_key(fam), serving.champion_key(fam), serving.endpoint_key(fam)]
        sensors += [
            build_registry_sensor(fam, ingest),
            *build_automation_sensors(fam, [k for k in conditions if k not in rollout_keys], rollout_keys),
        ]
        schedules.append(build_retrain_schedule(fam, job))
        watch_assets, watch_sensors, watch_jobs, watch_schedules = monitoring.build_monitoring(
            fam, job, retrain_on_drift())
        assets, sensors, jobs, schedules = (assets + watch_assets, sensors + watch_sensors, jobs + watch_jobs,
                                            schedules + watch_schedules)
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources=with_monitoring_defaults(resources) if resources is not None else build_resources(),
        executor=build_executor(
            train_ops=[a.op.name for a in assets if is_training_step(a)],
            other_ops=[a.op.name for a in assets if not is_training_step(a)],
        ),
    )

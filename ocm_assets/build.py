"""Builds the code location from the family table."""

from __future__ import annotations

import dagster as dg

from ocm_assets import data, serving, text, training
from ocm_assets.families import FAMILIES, Family
from ocm_assets.sensors import build_registry_sensor, build_retrain_schedule, build_rollout_sensor


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


def is_training_step(asset: dg.AssetsDefinition) -> bool:
    """Steps that train (torch): they get the training pod size (and GPUs) under the k8s executor."""
    return any("pytorch" in spec.kinds for spec in asset.specs)


def build_definitions(resources: dict | None = None, families: tuple[Family, ...] = FAMILIES) -> dg.Definitions:
    from ocm_resources.env import build_executor, build_resources

    assets, jobs, sensors, schedules = [], [], [], []
    for fam in families:
        fam_assets = family_assets(fam)
        job = retrain_job(fam, fam_assets)
        rollout = serving.rollout_job(fam)
        assets += fam_assets + serving.build_serving_assets(fam)
        jobs += [job, rollout]
        sensors += [build_registry_sensor(fam, job), build_rollout_sensor(fam, job, rollout)]
        schedules.append(build_retrain_schedule(fam, job))
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources=resources if resources is not None else build_resources(),
        executor=build_executor(
            train_ops=[a.op.name for a in assets if is_training_step(a)],
            other_ops=[a.op.name for a in assets if not is_training_step(a)],
        ),
    )

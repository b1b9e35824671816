"""Builds the code location from the family table."""

from __future__ import annotations

import dagster as dg

from ocm_assets import data
from ocm_assets.families import FAMILIES, Family
from ocm_assets.sensors import build_registry_sensor


def family_assets(fam: Family) -> list[dg.AssetsDefinition]:
    return [data.build_dataset_asset(fam), data.build_preprocessing_asset(fam)]


def retrain_job(fam: Family, assets: list[dg.AssetsDefinition]) :
    partitioned = [key for a in assets if a.partitions_def is not None for key in a.keys]
    return dg.define_asset_job(
        fam.retrain_job_name,
        selection=dg.AssetSelection.assets(*partitioned),
        description=f"Validate, preprocess and retrain {fam.name} for one registry version (partition).",
        tags={"ocm/family": fam.name},
    )


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    from ocm_resources.env import build_resources

    assets, jobs, sensors = [], [], []
    for fam in FAMILIES:
        fam_assets = family_assets(fam)
        job = retrain_job(fam, fam_assets)
        assets += fam_assets
        jobs.append(job)
        sensors.append(build_registry_sensor(fam, job))
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        resources=resources if resources is not None else build_resources(),
    )

"""Model assets: ``<family>/model`` trained with Ray Train DDP (images), one materialization per data version,
tracked and registered in MLflow. Thin: gather inputs from resources, call the ML core, report metadata."""

import base64
import dataclasses
import time
import typing
from typing import Any, ClassVar

import dagster as dg
import pydantic
from dagster_ray import RayResource

from ocm_assets.data import dataset_key, partitions_for, preprocessing_key, require_data_checks_passed
from ocm_assets.families import Family
from ocm_assets.reuse import lookup, reuse_metadata
from ocm_ml.contract import CONTENT_MD5_TAG, DatasetMetadata, DatasetVersion
from ocm_ml.vision.settings import TrainSettings
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.storage import CheckpointStorage


def model_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "model"])


class SettingsConfig(dg.Config):
    """A Dagster run config generated from a core settings dataclass (:func:`config_from_settings`);
    ``settings()`` builds that dataclass back from a run's values."""

    settings_class: ClassVar[type]

    def settings(self) -> Any:
        return self.settings_class(**self.model_dump())


def config_from_settings(settings_cls: type) -> type[SettingsConfig]:
    """The fields of ``settings_cls`` (a dataclass) as a :class:`SettingsConfig`: the same names, types,
    defaults and descriptions (``field(metadata={"description": ...})``), written once, in the core."""
    hints = typing.get_type_hints(settings_cls)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], pydantic.Field(default=f.default, description=f.metadata["description"]))
        for f in dataclasses.fields(settings_cls)
    }
    config = pydantic.create_model(f"{settings_cls.__name__}Fields", __base__=SettingsConfig, **fields)
    config.settings_class = settings_cls
    return config


class VisionTrainConfig(config_from_settings(TrainSettings)):
    """Ray Train DDP settings (``ocm_ml.vision.settings.TrainSettings``); the defaults finish on 2 CPUs."""

    def settings(self) -> TrainSettings:
        return super().settings()


def markdown_png(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def lineage(mlflow: MlflowTracking, context: dg.AssetExecutionContext,
            dataset: DatasetVersion) -> dict[str, str]:
    """DESIGN.md's lineage tags (``dvc_data_version`` = the registry tag), plus the ``content_md5``."""
    return {
        **mlflow.lineage_tags(
            dvc_data_version=dataset.registry_tag,
            dvc_commit=dataset.commit,
            dagster_run_id=context.run.run_id,
            dagster_partition=context.partition_key,
        ),
        CONTENT_MD5_TAG: dataset.content_md5,
    }


def build_vision_model_asset(fam: Family) -> dg.AssetsDefinition:
    @dg.asset(
        key=model_key(fam),
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        ins={"dataset": dg.AssetIn(dataset_key(fam)), "preprocessing": dg.AssetIn(preprocessing_key(fam))},
        description=f"ResNet18 trained with Ray Train DDP + Lightning on one data version of "
        f"`{fam.dataset}`, logged and registered in MLflow.",
        kinds={"ray", "pytorch", "mlflow"},
        tags={"ocm/family": fam.name},
    )
    def model(
        context: dg.AssetExecutionContext,
        config: VisionTrainConfig,
        ray_cluster: RayResource,
        mlflow: MlflowTracking,
        checkpoints: CheckpointStorage,
        dataset: DatasetVersion,
        preprocessing: DatasetMetadata,
    ) -> dg.MaterializeResult:
        import mlflow as mlflow_lib

        from ocm_ml.plots import training_curve_png
        from ocm_ml.vision.predictor import ImagePredictor
        from ocm_ml.vision.registered import log_image_model
        from ocm_ml.vision.train import train_fashion_mnist

        require_data_checks_passed(context, fam)
        settings = config.settings()
        reuse = lookup(context, fam, mlflow, dataset, preprocessing, dataclasses.asdict(settings))
        if reuse.version is not None:  # same data, preprocessing, code and config: nothing to train
            return dg.MaterializeResult(metadata=reuse_metadata(context, mlflow, reuse))
        norm = preprocessing.require_normalization()
        tag = context.partition_key
        storage_path = checkpoints.path_for(fam.name, tag, context.run.run_id)
        tags = lineage(mlflow, context, dataset)
        experiment = f"{mlflow.env_name}.{fam.dataset}"
        client = mlflow.configure()

        with mlflow.start_run(experiment, run_name=f"{tag} train {context.run.run_id[:8]}", tags=tags) as run:
            run_id = run.info.run_id
            mlflow_lib.log_params({**dataclasses.asdict(settings), "data_tag": tag, "mean": norm.mean,
                                   "std": norm.std, "storage_path": storage_path})

            on_epoch = epoch_logger(context, client, run_id)
            if getattr(ray_cluster, "is_client", False):  # Ray Client: Ray Data needs a driver on the head
                result = train_as_ray_job(context, ray_cluster, checkpoints, dict(
                    train_url=dataset.url("train"), val_url=dataset.url("val"), mean=norm.mean, std=norm.std,
                    settings=dataclasses.asdict(settings), storage_path=storage_path,
                    run_name=f"{fam.name}-{tag}",
                ))
                for record in result.history:  # per-epoch figures at step = epoch, as in-process
                    on_epoch(record)
            else:
                result = train_fashion_mnist(
                    dataset.url("train"), dataset.url("val"), norm.mean, norm.std, settings,
                    storage_path=storage_path, run_name=f"{fam.name}-{tag}",
                    storage_filesystem=checkpoints.filesystem(), on_epoch=on_epoch,
                )
            png = training_curve_png(result.history, f"{fam.name} {tag}")
            log_bytes(client, run_id, png, "training_curve.png")
            # The best checkpoint's figures, at the step after the last epoch: MLflow's latest value of a
            # metric is the one with the highest step, so it reads the model that is registered.
            mlflow_lib.log_metrics({
                "val_accuracy": result.val_accuracy,
                "val_loss": result.val_loss,
                "images_per_second": result.images_per_second,
                "worker_failures": len(result.failures),
            }, step=len(result.history))
            predictor = ImagePredictor(result.load_model(), norm.mean, norm.std,
                                       list(preprocessing.class_names))
            model_info = log_image_model(predictor)
            mlflow_lib.set_tag("checkpoint_path", result.checkpoint_path)

        version = mlflow.register(model_info.model_uri, fam.dataset,
                                  tags={**tags, **reuse.tags, "data_version": tag,
                                        "val_accuracy": f"{result.val_accuracy:.6f}"})
        url = mlflow.run_url(run_id, run.info.experiment_id)
        return dg.MaterializeResult(metadata={
            **trained_metadata(result, png), "mlflow_run_id": run_id,
            **({"mlflow_run_url": dg.MetadataValue.url(url)} if url else {}),
            "registered_model": version.name, "registered_version": int(version.version),
            "model_uri": f"models:/{version.name}/{version.version}",
            "reused": False, "training_key": reuse.key,
        })

    return model


TRAIN_JOB_MODULE = "ocm_ml.vision.train_job"


def train_as_ray_job(context: dg.AssetExecutionContext, ray_cluster: Any, checkpoints: CheckpointStorage,
                     spec: dict[str, Any]):
    """Train through a Ray Job on the head (``ocm_ml.vision.train_job``) and read its ``TrainResult`` back
    from checkpoint storage. Only the S3 keys the driver needs reach the job, through its runtime env."""
    from ocm_ml.vision.train import TrainResult

    filesystem = checkpoints.filesystem()
    s3, env_vars = checkpoints.s3_options(), checkpoints.credential_env()
    result_path = f"{spec['storage_path'].rstrip('/')}/train_result.json"
    data = ray_cluster.run_job(TRAIN_JOB_MODULE, {**spec, "s3": s3, "result_path": result_path},
                               result_path, filesystem=filesystem, env_vars=env_vars, log=context.log.info)
    return TrainResult.from_dict(data, storage_filesystem=filesystem)


def epoch_logger(context: dg.AssetExecutionContext, client, run_id: str):
    """``on_epoch`` for the trainer: a line per epoch in the Dagster run log, its metrics in MLflow."""
    from mlflow.entities import Metric

    def on_epoch(record: dict) -> None:
        epoch = int(record.get("epoch", 0))
        figures = {k: float(v) for k, v in record.items() if k != "epoch"}
        context.log.info(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in figures.items()])

    return on_epoch


def trained_metadata(result, png: bytes) -> dict:
    """The materialization metadata of a finished training run (``ocm_ml.vision.train.TrainResult``)."""
    return {
        "val_accuracy": dg.MetadataValue.float(result.val_accuracy),
        "val_loss": dg.MetadataValue.float(result.val_loss),
        "checkpoint_path": result.checkpoint_path,
        "images_per_second": dg.MetadataValue.float(result.images_per_second),
        "workers": result.num_workers,
        "train_rows": result.train_rows,
        "worker_failures_recovered": len(result.failures),
        "training_seconds": dg.MetadataValue.float(result.elapsed_seconds),
        "training_curve": markdown_png(png, "training curve"),
        "history": dg.MetadataValue.json(result.history),
    }


def ray_cluster_resources(ray_cluster: RayResource) -> dict[str, float]:
    if hasattr(ray_cluster, "cluster_resources"):
        return ray_cluster.cluster_resources()
    import ray

    return dict(ray.cluster_resources())


def log_bytes(client, run_id: str, payload: bytes, name: str) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(payload)
        client.log_artifact(run_id, str(path))

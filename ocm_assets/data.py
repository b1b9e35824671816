"""Dataset and preprocessing assets per family, with their blocking checks.

``<family>/dataset`` resolves a registry tag (the partition key) to a :class:`~ocm_ml.contract.DatasetVersion`
(commit, DVC URLs and md5s, checked ``metadata.json``) and validates the rows with pandera, batch by batch.
Its data version is the ``content_md5`` (the DVC md5s), so re-tagging the same content is not new data and a
moved tag with new content is.

``<family>/preprocessing`` takes that version's metadata (normalization mean/std, or the label map), checks it
against statistics recomputed from the data and returns it (a :class:`~ocm_ml.contract.DatasetMetadata`).
"""


import hashlib
import json
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ocm_assets.families import Family
from ocm_ml.contract import SPLITS, DatasetMetadata, DatasetVersion, split_path
from ocm_resources.registry import DataRegistry, RegistryVersion

NORMALIZATION_TOLERANCE = 1e-3


def partitions_for(fam: Family) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=fam.partitions_name)


def dataset_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "dataset"])


def preprocessing_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "preprocessing"])


def blocking_checks(fam: Family) -> list[tuple[dg.AssetKey, str]]:
    """The blocking data checks every training step of a partition depends on."""
    return [(dataset_key(fam), "schema"), (preprocessing_key(fam), preprocessing_check(fam))]


def preprocessing_check(fam: Family) -> str:
    """The preprocessing asset's blocking check: normalization (images) or label map (texts) vs the data."""
    return "normalization_matches_data" if fam.kind == "image" else "label_map_matches_data"


def require_data_checks_passed(context: dg.AssetExecutionContext, fam: Family) -> None:
    """Refuse to train on a partition whose latest dataset/preprocessing materialization did not pass its
    blocking checks. Within one run Dagster's blocking checks already stop the chain; this also covers a
    training step materialized by hand in a later run."""
    partition = context.partition_key
    for key, check in blocking_checks(fam):
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
        if not records:
            raise dg.Failure(f"{key.to_user_string()} has never been materialized for {partition}: "
                             "materialize it (and pass its checks) before training on it")
        run_id = records[0].run_id
        evaluations = [
            e.dagster_event.event_specific_data
            for e in context.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            if e.dagster_event is not None
        ]
        # Events of this type carry an AssetCheckEvaluation; the isinstance narrows the union for the checker.
        found = [ev for ev in evaluations if isinstance(ev, dg.AssetCheckEvaluation)
                 and ev.asset_key == key and ev.check_name == check]
        if not found or not found[-1].passed:
            what = "did not run" if not found else "failed"
            raise dg.Failure(
                f"the blocking check {check} of {key.to_user_string()} [{partition}] {what} in its latest "
                f"materialization (run {run_id[:8]}): refusing to train on data that did not pass "
                "validation. Fix the data and publish a new version, or re-materialize the data assets if it "
                "was transient.")


def iter_batches(registry: DataRegistry, version: RegistryVersion, split: str, columns=None) -> Iterator[Any]:
    """Stream a split's parquet from the registry in record batches (never the whole table at once)."""
    yield from registry.iter_batches(version, split_path(version.dataset, split), columns)


def registry_version(dataset: DatasetVersion) -> RegistryVersion:
    """The registry's handle of a dataset version (to read its files again)."""
    return RegistryVersion(dataset.dataset, dataset.version, dataset.registry_tag, dataset.commit)


def _validate(fam: Family, registry: DataRegistry, version: RegistryVersion, label_ids: list[int]):
    from ocm_ml.validation import ValidationReport, validate_image_batches, validate_text_batches

    reports: dict[str, ValidationReport] = {}
    for split in SPLITS:
        batches = iter_batches(registry, version, split)
        try:
            if fam.kind == "image":
                reports[split] = validate_image_batches(batches, num_classes=len(label_ids))
            else:
                reports[split] = validate_text_batches(batches, labels=label_ids)
        except ValueError as exc:  # wrong columns: a schema failure, not a crash
            reports[split] = ValidationReport(rows=0, failures={str(exc): 0})
    return reports


def partitioned_check(name: str, **kwargs: Any) -> dg.AssetCheckSpec:
    """A blocking data check with one result per data version (``partitions_def``), so one bad version's
    failure never blocks the automation of another. Partitioned checks are a preview in Dagster 1.13: its
    PreviewWarning is silenced here, where ocm chooses the feature, and nowhere else."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name, **kwargs)


def build_dataset_asset(fam: Family) -> dg.AssetsDefinition:
    key = dataset_key(fam)
    schema_check = partitioned_check(
        "schema",
        asset=key,
        blocking=True,
        partitions_def=partitions_for(fam),  # one result per data version
        description=(
            "pandera schema on every row, streamed in batches: "
            + (
                "28x28 images, pixels 0-255, labels in range, no nulls"
                if fam.kind == "image"
                else "non-empty texts, labels in the label map, no nulls"
            )
        ),
    )

    @dg.asset(
        key=key,
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        check_specs=[schema_check],
        description=f"{fam.description}: one registry version (tag) of `{fam.dataset}`, validated.",
        kinds={"dvc", "parquet"},
        tags={"ocm/family": fam.name},
    )
    def dataset(context: dg.AssetExecutionContext, registry: DataRegistry):
        version = registry.resolve(context.partition_key)
        record = registry.dataset_version(version, fam.kind)
        names = record.metadata.class_names
        label_ids = list(range(len(names)))

        rows, schemas = {}, {}
        for split in SPLITS:
            with registry.parquet(version, split_path(version.dataset, split)) as parquet:
                rows[split], schemas[split] = parquet.metadata.num_rows, parquet.schema_arrow
        from ocm_ml.validation import label_counts

        balance = label_counts(iter_batches(registry, version, "train", columns=["label"]))
        balance_named = {
            str(names[i]) if 0 <= i < len(names) else f"unknown:{i}": n for i, n in balance.items()
        }
        reports = _validate(fam, registry, version, label_ids)
        passed = all(r.passed for r in reports.values())
        failures = {f"{split}: {k}": v for split, r in reports.items() for k, v in r.failures.items()}
        context.log.info(
            f"{version.tag} @ {version.commit[:10]}: "
            + "; ".join(f"{split} {r.summary()}" for split, r in reports.items())
        )
        yield dg.Output(
            record,
            data_version=dg.DataVersion(record.content_md5),
            metadata={
                "tag": version.tag,
                "commit": version.commit,
                "dvc_md5": dg.MetadataValue.json({s: record.files[s].md5 for s in SPLITS}),
                "file_urls": dg.MetadataValue.json({s: record.url(s) for s in SPLITS}),
                "rows_train": rows["train"],
                "rows_val": rows["val"],
                "class_balance_train": dg.MetadataValue.json(balance_named),
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(f.name, str(f.type)) for f in schemas[SPLITS[-1]]]
                ),
                "dagster/row_count": rows["train"] + rows["val"],
            },
        )
        yield dg.AssetCheckResult(
            check_name="schema",
            asset_key=key,
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None if passed else "; ".join(f"{k} ({v} rows)" for k, v in failures.items()),
            metadata={
                **{f"{split}_rows": r.rows for split, r in reports.items()},
                "failed_rows": sum(r.failed_rows for r in reports.values()),
                "failures": dg.MetadataValue.json(failures),
                "examples": dg.MetadataValue.json([e for r in reports.values() for e in r.examples]),
                "flagged": dg.MetadataValue.json(
                    {f"{split}: {k}": v for split, r in reports.items() for k, v in r.flagged.items()}
                ),
            },
        )

    return dataset


def build_preprocessing_asset(fam: Family) -> dg.AssetsDefinition:
    key = preprocessing_key(fam)
    check_name = preprocessing_check(fam)
    agree_check = partitioned_check(
        check_name,
        asset=key,
        blocking=True,
        partitions_def=partitions_for(fam),  # one result per data version
        description=(
            "published mean/std agree with statistics recomputed from the training split"
            if fam.kind == "image"
            else "the label map names exactly the labels that occur in the data"
        ),
    )

    @dg.asset(
        key=key,
        group_name=fam.name,
        partitions_def=partitions_for(fam),
        ins={"dataset": dg.AssetIn(dataset_key(fam))},
        check_specs=[agree_check],
        description=(
            "Normalization mean/std from metadata.json at this version"
            if fam.kind == "image"
            else "Label map from metadata.json at this version"
        ),
        kinds={"dvc", "json"},
        tags={"ocm/family": fam.name},
    )
    def preprocessing(context: dg.AssetExecutionContext, registry: DataRegistry, dataset: DatasetVersion):
        version = registry_version(dataset)
        metadata = dataset.metadata
        if fam.kind == "image":
            passed, check_meta = _normalization_agrees(registry, version, metadata)
            norm = metadata.require_normalization()
            value = {"mean": norm.mean, "std": norm.std,
                     "classes": list(metadata.class_names)}
            ui_meta = {"mean": value["mean"], "std": value["std"],
                       "classes": dg.MetadataValue.json(value["classes"])}
        else:
            passed, check_meta = _label_map_agrees(registry, version, metadata)
            value = {"label_map": metadata.require_label_map()}
            ui_meta = {"label_map": dg.MetadataValue.json(value["label_map"]),
                       "num_labels": len(value["label_map"])}
        # content, not the tag: the same preprocessing of the same data is the same data version
        digest = hashlib.sha256(json.dumps({**value, "content_md5": dataset.content_md5}, sort_keys=True)
                                .encode()).hexdigest()[:16]
        context.log.info(f"{version.tag} @ {version.commit[:10]}: "
                         f"{json.dumps({k: v for k, v in value.items() if k != 'classes'})}")
        yield dg.Output(metadata, data_version=dg.DataVersion(digest),
                        metadata={**ui_meta, "tag": version.tag})
        yield dg.AssetCheckResult(
            check_name=check_name, asset_key=key, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
            metadata=check_meta,
        )

    return preprocessing


def _normalization_agrees(registry: DataRegistry, version: RegistryVersion, metadata: DatasetMetadata):
    """Whether the published mean/std agree with the training split's, recomputed streaming."""
    from ocm_ml.validation import pixel_stats_streaming

    norm = metadata.require_normalization()
    mean, std = norm.mean, norm.std
    stats = pixel_stats_streaming(iter_batches(registry, version, "train", columns=["image"]))
    passed = max(abs(stats.mean - mean), abs(stats.std - std)) <= NORMALIZATION_TOLERANCE
    check_meta = {
        "published_mean": mean,
        "published_std": std,
        "recomputed_mean": stats.mean,
        "recomputed_std": stats.std,
        "tolerance": NORMALIZATION_TOLERANCE,
    }
    return passed, check_meta


def _label_map_agrees(registry: DataRegistry, version: RegistryVersion, metadata: DatasetMetadata):
    """Whether the label map names exactly the labels that occur in the splits."""
    from ocm_ml.validation import label_counts

    seen: set[int] = set()
    for split in SPLITS:
        seen |= set(label_counts(iter_batches(registry, version, split, columns=["label"])))
    published = {int(k) for k in metadata.require_label_map()}
    passed = seen == published
    check_meta = {
        "labels_in_map": dg.MetadataValue.json(sorted(published)),
        "labels_in_data": dg.MetadataValue.json(sorted(seen)),
        "unused_in_data": dg.MetadataValue.json(sorted(published - seen)),
        "missing_from_map": dg.MetadataValue.json(sorted(seen - published)),
    }
    return passed, check_meta

"""Dataset and preprocessing assets per family, with their blocking checks.

``<family>/dataset`` resolves a registry tag (the partition key) to its commit, DVC URLs and md5s and
validates the rows with pandera, batch by batch. Its data version is the DVC md5s, so re-tagging the same
content is not new data and a moved tag with new content is.

``<family>/preprocessing`` reads ``metadata.json`` at that revision (normalization mean/std, or the label
map) and checks it against statistics recomputed from the data.
"""


import hashlib
import json
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ocm_assets.families import Family
from ocm_ml.contract import SPLITS
from ocm_resources.registry import DataRegistry, RegistryError, RegistryVersion

BATCH_ROWS = 8192
NORMALIZATION_TOLERANCE = 1e-3


def partitions_for(fam: Family) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=fam.partitions_name)


def dataset_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "dataset"])


def preprocessing_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "preprocessing"])


def blocking_checks(fam: Family) -> list[tuple[dg.AssetKey, str]]:
    """The blocking data checks every training step of a partition depends on."""
    return [(dataset_key(fam), "schema"),
            (preprocessing_key(fam), "normalization_matches_data" if fam.kind == "image" else "label_map_matches_data")]


def require_data_checks_passed(context: dg.AssetExecutionContext, fam: Family) -> None:
    """Refuse to train on a partition whose latest dataset/preprocessing materialization did not pass its
    blocking checks. Within one run Dagster's blocking checks already stop the chain; this also covers a
    training step materialized by hand in a later run."""
    partition = context.partition_key
    for key, check in blocking_checks(fam):
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
        if not records:
            raise dg.Failure(f"{key.to_user_string()} has never been materialized for {partition}: materialize it "
                             "(and pass its checks) before training on it")
        run_id = records[0].run_id
        evaluations = [
            e.dagster_event.event_specific_data
            for e in context.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
            if e.dagster_event is not None
        ]
        found = [ev for ev in evaluations if ev.asset_key == key and ev.check_name == check]
        if not found or not found[-1].passed:
            what = "did not run" if not found else "failed"
            raise dg.Failure(
                f"the blocking check {check} of {key.to_user_string()} [{partition}] {what} in its latest "
                f"materialization (run {run_id[:8]}): refusing to train on data that did not pass validation. "
                "Fix the data and publish a new version, or re-materialize the data assets if it was transient.")


def iter_batches(registry: DataRegistry, version: RegistryVersion, split: str, columns=None) -> Iterator[Any]:
    """Stream a split's parquet from the registry in record batches (never the whole table at once)."""
    yield from iter_parquet(registry, version, f"{version.dataset}/{split}.parquet", columns)


def iter_parquet(registry: DataRegistry, version: RegistryVersion, path: str, columns=None) -> Iterator[Any]:
    """Stream any registry parquet file (a split, the holdout) in record batches."""
    import pyarrow.parquet as pq

    with registry.open(version, path) as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except Exception as exc:
            raise RegistryError(f"{path} at {version.tag} is not a readable parquet file: {exc}") from exc
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _parquet_summary(registry: DataRegistry, version: RegistryVersion, split: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    path = f"{version.dataset}/{split}.parquet"
    with registry.open(version, path) as fh:
        meta = pq.ParquetFile(fh).schema_arrow, pq.ParquetFile(fh).metadata.num_rows
    return {"schema": meta[0], "rows": meta[1]}


def _version_payload(registry: DataRegistry, version: RegistryVersion) -> dict[str, Any]:
    files = {split: registry.file_info(version, f"{version.dataset}/{split}.parquet") for split in SPLITS}
    return {
        "dataset": version.dataset,
        "tag": version.tag,
        "version": version.version,
        "commit": version.commit,
        "files": {
            split: {"path": f.path, "url": f.url, "md5": f.md5, "size": f.size} for split, f in files.items()
        },
    }


def data_version_of(payload: dict[str, Any]) -> str:
    """The DVC md5s of the splits: identical content under another tag gives the same data version."""
    return "+".join(payload["files"][split]["md5"] for split in SPLITS)


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


def label_ids_from_metadata(fam: Family, metadata: dict[str, Any], tag: str) -> list[int]:
    if fam.kind == "image":
        classes = metadata.get("classes")
        if not isinstance(classes, list) or not classes:
            raise RegistryError(f"metadata.json at {tag} needs a non-empty 'classes' list for an image dataset")
        return list(range(len(classes)))
    label_map = metadata.get("label_map")
    if not isinstance(label_map, dict) or not label_map:
        raise RegistryError(f"metadata.json at {tag} needs a non-empty 'label_map' object for a text dataset")
    try:
        return sorted(int(k) for k in label_map)
    except ValueError as exc:
        raise RegistryError(f"label_map keys at {tag} must be integer class ids, got {list(label_map)}") from exc


def build_dataset_asset(fam: Family) -> dg.AssetsDefinition:
    key = dataset_key(fam)
    schema_check = dg.AssetCheckSpec(
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
        payload = _version_payload(registry, version)
        metadata = registry.read_metadata(version)
        label_ids = label_ids_from_metadata(fam, metadata, version.tag)

        rows, columns = {}, None
        for split in SPLITS:
            summary = _parquet_summary(registry, version, split)
            rows[split] = summary["rows"]
            columns = summary["schema"]
        from ocm_ml.validation import label_counts

        balance = label_counts(iter_batches(registry, version, "train", columns=["label"]))
        names = metadata.get("classes") or [metadata["label_map"][str(i)] for i in label_ids]
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
        data_version = data_version_of(payload)
        yield dg.Output(
            payload,
            data_version=dg.DataVersion(data_version),
            metadata={
                "tag": version.tag,
                "commit": version.commit,
                "dvc_md5": dg.MetadataValue.json({s: payload["files"][s]["md5"] for s in SPLITS}),
                "file_urls": dg.MetadataValue.json({s: payload["files"][s]["url"] for s in SPLITS}),
                "rows_train": rows["train"],
                "rows_val": rows["val"],
                "class_balance_train": dg.MetadataValue.json(balance_named),
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(f.name, str(f.type)) for f in columns]
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
            },
        )

    return dataset


def build_preprocessing_asset(fam: Family) -> dg.AssetsDefinition:
    key = preprocessing_key(fam)
    check_name = "normalization_matches_data" if fam.kind == "image" else "label_map_matches_data"
    agree_check = dg.AssetCheckSpec(
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
    def preprocessing(context: dg.AssetExecutionContext, registry: DataRegistry, dataset: dict[str, Any]):
        version = RegistryVersion(dataset["dataset"], dataset["version"], dataset["tag"], dataset["commit"])
        metadata = registry.read_metadata(version)
        if fam.kind == "image":
            value, passed, check_meta = _normalization(registry, version, metadata)
            ui_meta = {"mean": value["mean"], "std": value["std"], "classes": dg.MetadataValue.json(value["classes"])}
        else:
            value, passed, check_meta = _label_map(registry, version, metadata)
            ui_meta = {"label_map": dg.MetadataValue.json(value["label_map"]), "num_labels": len(value["label_map"])}
        value = {**value, "tag": version.tag, "commit": version.commit, "data_version": data_version_of(dataset)}
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
        context.log.info(f"{version.tag}: {json.dumps({k: v for k, v in value.items() if k != 'classes'})}")
        yield dg.Output(value, data_version=dg.DataVersion(digest), metadata={**ui_meta, "tag": version.tag})
        yield dg.AssetCheckResult(
            check_name=check_name, asset_key=key, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
            metadata=check_meta,
        )

    return preprocessing


def _normalization(registry: DataRegistry, version: RegistryVersion, metadata: dict[str, Any]):
    from ocm_ml.validation import pixel_stats_streaming

    norm = metadata.get("normalization")
    if not isinstance(norm, dict) or not {"mean", "std"} <= set(norm):
        raise RegistryError(
            f"metadata.json at {version.tag} needs 'normalization': {{'mean': …, 'std': …}} for an image dataset"
        )
    mean, std = float(norm["mean"]), float(norm["std"])
    if not std > 0:
        raise RegistryError(f"normalization std at {version.tag} must be positive, got {std}")
    stats = pixel_stats_streaming(iter_batches(registry, version, "train", columns=["image"]))
    passed = abs(stats.mean - mean) <= NORMALIZATION_TOLERANCE and abs(stats.std - std) <= NORMALIZATION_TOLERANCE
    value = {"mean": mean, "std": std, "classes": list(metadata.get("classes") or [])}
    check_meta = {
        "published_mean": mean,
        "published_std": std,
        "recomputed_mean": stats.mean,
        "recomputed_std": stats.std,
        "tolerance": NORMALIZATION_TOLERANCE,
    }
    return value, passed, check_meta


def _label_map(registry: DataRegistry, version: RegistryVersion, metadata: dict[str, Any]):
    from ocm_ml.validation import label_counts

    label_map = metadata.get("label_map")
    if not isinstance(label_map, dict) or not label_map:
        raise RegistryError(f"metadata.json at {version.tag} needs a non-empty 'label_map' for a text dataset")
    seen: set[int] = set()
    for split in SPLITS:
        seen |= set(label_counts(iter_batches(registry, version, split, columns=["label"])))
    published = {int(k) for k in label_map}
    passed = seen == published
    check_meta = {
        "labels_in_map": dg.MetadataValue.json(sorted(published)),
        "labels_in_data": dg.MetadataValue.json(sorted(seen)),
        "unused_in_data": dg.MetadataValue.json(sorted(published - seen)),
        "missing_from_map": dg.MetadataValue.json(sorted(seen - published)),
    }
    return {"label_map": {str(k): v for k, v in sorted(label_map.items(), key=lambda kv: int(kv[0]))}}, passed, check_meta

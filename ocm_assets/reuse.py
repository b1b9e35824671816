"""No retraining of data already seen: a lookup in the MLflow registry by a training key.

The key is a digest of what decides the trained weights: the DVC md5s of the splits (the dataset's data
version), the preprocessing read from ``metadata.json`` (normalization and classes, or the label map), the
code version (``code_version`` lineage tag: the git commit, or the image's ``OCM_CODE_VERSION``) and the
training config (the whole run config of the training step). Every version ocm registers carries it as the
tag ``ocm_training_key``. Before a training step (``<family>/model`` for images, ``<family>/hpo`` for texts)
trains or searches, it looks for a version with its key; when there is one, nothing is trained: that
version is tagged ``ocm_partition.<tag>`` (value: the Dagster run id) and the step's materialization names
it (``reused_from_version``, ``registered_version``), which is where ``<family>/evaluation`` finds the
challenger of the new partition.

A checkout with uncommitted changes (code version ``…-dirty``) never reuses: its code version does not say
which code trained the model. A run tagged ``ocm/reuse=off`` always trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import dagster as dg

from ocm_assets.families import Family
from ocm_ml.contract import SPLITS
from ocm_resources.mlflow import MlflowTracking

KEY_TAG = "ocm_training_key"
#: Run tag: ``off`` trains even when a version with the same key exists (the scheduled retrain sets it).
REUSE_TAG = "ocm/reuse"
PARTITION_TAG_PREFIX = "ocm_partition."
#: Keys of the preprocessing value that name the version, not its content.
_NOT_CONTENT = ("tag", "commit", "data_version")


def content_md5(dataset: Any) -> str:
    """The DVC md5s of the splits, from the dataset asset's value."""
    if hasattr(dataset, "content_md5"):
        return dataset.content_md5
    return "+".join(dataset["files"][split]["md5"] for split in SPLITS)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def preprocessing_content(preprocessing: Any) -> dict[str, Any]:
    """What the preprocessing says about the data (normalization and classes, or the label map), without the
    tag and commit it was read at."""
    if isinstance(preprocessing, Mapping):
        return {k: _plain(v) for k, v in preprocessing.items() if k not in _NOT_CONTENT}
    return {k: _plain(getattr(preprocessing, k, None)) for k in ("normalization", "classes", "label_map")}


def training_key(fam: Family, dataset: Any, preprocessing: Any, config: dict[str, Any],
                 code_version: str) -> str:
    payload = {
        "kind": fam.kind,
        "dataset": fam.dataset,
        "dvc_md5": content_md5(dataset),
        "preprocessing": preprocessing_content(preprocessing),
        "code_version": code_version,
        "config": config,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def partition_tag(partition: str) -> str:
    return f"{PARTITION_TAG_PREFIX}{partition}"


def serves_partition(version, partition: str) -> bool:
    """The version was registered for ``partition``, or reused for it."""
    return version.tags.get("dagster_partition") == partition or partition_tag(partition) in version.tags


def find_trained(mlflow: MlflowTracking, fam: Family, key: str):
    """The newest registered version with training key ``key``, or None."""
    name = mlflow.model_name(fam.dataset).replace("'", "\\'")
    found = mlflow.client.search_model_versions(
        f"name = '{name}' AND tags.{KEY_TAG} = '{key}'", max_results=1, order_by=["version_number DESC"])
    return found[0] if found else None


class Reuse:
    """The outcome of the lookup for one training step: ``key`` (tag it on what the step registers) and
    ``version`` (the registered version to reuse instead of training, or None)."""

    def __init__(self, key: str, code_version: str, version=None):
        self.key, self.code_version, self.version = key, code_version, version

    @property
    def tags(self) -> dict[str, str]:
        return {KEY_TAG: self.key}


def lookup(context: dg.AssetExecutionContext, fam: Family, mlflow: MlflowTracking, dataset: Any,
           preprocessing: Any, config: dict[str, Any]) -> Reuse:
    """Compute the training key of this step and find a version trained with it (see the module doc)."""
    code_version = mlflow.lineage_tags(dvc_data_version="", dvc_commit="", dagster_run_id="",
                                       dagster_partition=None)["code_version"]
    key = training_key(fam, dataset, preprocessing, config, code_version)
    mlflow.configure()
    partition = context.partition_key
    if context.run.tags.get(REUSE_TAG) == "off":
        context.log.info(f"{partition}: run tag {REUSE_TAG}=off: training without looking for an earlier "
                         "model")
        return Reuse(key, code_version)
    if code_version.endswith("-dirty"):
        context.log.info(f"{partition}: code version {code_version} has uncommitted changes, so no earlier "
                         "model can be known to match it: training (commit to make models reusable)")
        return Reuse(key, code_version)
    version = find_trained(mlflow, fam, key)
    if version is None:
        context.log.info(f"{partition}: no registered version has training key {key} (data md5 "
                         f"{content_md5(dataset)}, code {code_version}, this config): training")
        return Reuse(key, code_version)
    return Reuse(key, code_version, version)


def reuse_metadata(context: dg.AssetExecutionContext, mlflow: MlflowTracking, reuse: Reuse) -> dict[str, Any]:
    """Tag the found version with this partition, log that nothing is trained, return the metadata."""
    version, partition = reuse.version, context.partition_key
    assert version is not None, "reuse_metadata is called only when lookup() found a version"
    mlflow.client.set_model_version_tag(version.name, version.version, partition_tag(partition),
                                        context.run.run_id)
    origin = version.tags.get("dagster_partition", "?")
    context.log.info(
        f"{partition}: reusing {version.name} v{version.version}, trained for {origin} (MLflow run "
        f"{version.run_id}) on the same data md5s and preprocessing, with code {reuse.code_version} and "
        f"the same config (training key {reuse.key}): nothing is trained or searched; v{version.version} "
        f"is tagged {partition_tag(partition)}")
    return {
        "reused": True,
        "reused_from_partition": origin,
        "reused_from_version": int(version.version),
        "training_key": reuse.key,
        "registered_model": version.name,
        "registered_version": int(version.version),
        "model_uri": f"models:/{version.name}/{version.version}",
        "mlflow_run_id": version.run_id or "",
        **({"val_accuracy": float(version.tags["val_accuracy"])} if "val_accuracy" in version.tags else {}),
    }


def reused_search(context: dg.AssetExecutionContext, mlflow: MlflowTracking, reuse: Reuse) -> dg.Output:
    """The search step's output when a version is reused: the text model step then registers nothing."""
    metadata = reuse_metadata(context, mlflow, reuse)
    return dg.Output({"tag": context.partition_key, "reused": metadata}, metadata=metadata)


def key_tags(search: dict[str, Any]) -> dict[str, str]:
    """The training-key tag for what the text model step registers from a search's output."""
    return {KEY_TAG: search["training_key"]} if "training_key" in search else {}

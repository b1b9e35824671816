"""The registry contract, as one pure vocabulary: tag grammar, split and holdout names, lineage tag names, the
``metadata.json`` record and its rules (label map, normalization), the dataset-version record that passes
between assets, and how rows are compared. Imports nothing heavy at module level; ``ocm_resources`` may import
this module (and no other part of ``ocm_ml``).

Names, each used for one thing only:

- ``registry_tag``: the git tag of a dataset version (``fashion-mnist-v1.0.0``); MLflow's run tag
  ``dvc_data_version`` and the endpoint's ``data_version`` hold it.
- ``commit``: the registry commit the tag pointed at when it was read (MLflow ``dvc_commit``).
- ``content_md5``: the DVC md5s of the splits, ``<train md5>+<val md5>`` (MLflow ``dvc_md5``; the dataset
  asset's Dagster data version), so re-tagging identical content is not new data.
- ``code_version``: the git commit of the ocm checkout that trained a model (MLflow ``code_version``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``<dataset>-v<major>.<minor>.<patch>``: one dataset version.
TAG_RE = re.compile(r"^(?P<dataset>[a-z0-9][a-z0-9._-]*?)-v(?P<version>\d+\.\d+\.\d+)$")
#: The DVC-tracked splits of a version: ``<dataset>/<split>.parquet``.
SPLITS = ("train", "val")
#: The run and model-version tags every ocm training run carries (DESIGN.md, "Contracts").
LINEAGE_TAGS = ("dvc_data_version", "dvc_commit", "dagster_run_id", "dagster_partition", "docker_image_tag",
                "code_version")
#: The MLflow tag that holds a run's :attr:`DatasetVersion.content_md5`.
CONTENT_MD5_TAG = "dvc_md5"
METADATA_FILE = "metadata.json"


class ContractError(ValueError):
    """Registry content breaks the contract: the message says what was found and what it must be."""


def parse_tag(tag: str) -> tuple[str, str]:
    """``(dataset, version)`` of a registry version tag; :class:`ContractError` otherwise."""
    match = TAG_RE.match(tag)
    if not match:
        raise ContractError(
            f"{tag!r} is not a registry version tag: expected <dataset>-v<major>.<minor>.<patch>, "
            "for example fashion-mnist-v1.0.0"
        )
    return match["dataset"], match["version"]


def split_path(dataset: str, split: str) -> str:
    """Where a split lives in the registry (DVC-tracked parquet)."""
    return f"{dataset}/{split}.parquet"


def metadata_path(dataset: str) -> str:
    """Where a version's ``metadata.json`` lives (in git)."""
    return f"{dataset}/{METADATA_FILE}"


def holdout_tag(dataset: str) -> str:
    """The git tag of a dataset's fixed holdout. It does not match :data:`TAG_RE` (not a version)."""
    return f"holdout/{dataset}"


def holdout_path(dataset: str) -> str:
    """Where the holdout lives in the registry (DVC-tracked, same schema as the splits)."""
    return f"holdout/{dataset}.parquet"


# --- metadata.json ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Pixel mean and standard deviation of the training split, pixels scaled to [0, 1]."""

    mean: float
    std: float


def check_normalization(value: Any, where: str = "metadata.json") -> Normalization:
    """The one rule for a normalization: ``{"mean": m, "std": s}`` with finite numbers and ``s > 0``."""
    if not isinstance(value, Mapping) or not {"mean", "std"} <= set(value):
        raise ContractError(f"{where} needs 'normalization': {{'mean': …, 'std': …}} for an image dataset, "
                            f"got {value!r}")
    try:
        mean, std = float(value["mean"]), float(value["std"])
    except (TypeError, ValueError) as exc:
        raise ContractError(
            f"{where}: normalization mean and std must be numbers, got {dict(value)!r}") from exc
    if not (math.isfinite(mean) and math.isfinite(std)) or not std > 0:
        raise ContractError(f"{where}: normalization std must be positive and both finite, got mean={mean}, "
                            f"std={std}")
    return Normalization(mean, std)


def check_label_map(value: Any, where: str = "metadata.json") -> dict[str, str]:
    """The one rule for a label map: keys exactly ``"0".."n-1"`` (class ids as strings), distinct non-empty
    names. Returns it ordered by id; :class:`ContractError` says what is wrong otherwise."""
    if not isinstance(value, Mapping) or not value:
        raise ContractError(f"{where} needs a non-empty 'label_map' object {{'0': 'name', '1': 'name', …}}, "
                            f"got {value!r}")
    labels = {str(k): v for k, v in value.items()}
    expected = [str(i) for i in range(len(labels))]
    if sorted(labels) != sorted(expected):
        raise ContractError(f"{where}: label_map keys must be the ids 0..{len(labels) - 1} as strings (one "
                            f"per class), got {sorted(labels, key=lambda k: (len(k), k))}")
    names = [labels[k] for k in expected]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ContractError(f"{where}: label_map names must be non-empty strings, got {names}")
    if len(set(names)) != len(names):
        raise ContractError(f"{where}: label_map has duplicate names, they must be distinct: {names}")
    return dict(zip(expected, names, strict=True))


def check_classes(value: Any, where: str = "metadata.json") -> tuple[str, ...]:
    """Image class names: a non-empty list of distinct non-empty strings, index = class id."""
    if not isinstance(value, list | tuple) or not value:
        raise ContractError(f"{where} needs a non-empty 'classes' list for an image dataset, got {value!r}")
    if not all(isinstance(c, str) and c.strip() for c in value) or len(set(value)) != len(value):
        raise ContractError(f"{where}: 'classes' must be distinct non-empty strings, got {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class DatasetMetadata:
    """A version's ``metadata.json``, checked: the normalization and classes (images) or the label map (texts)
    the contract defines, and ``raw``, the whole object as published."""

    raw: Mapping[str, Any] = field(repr=False)
    normalization: Normalization | None = None
    classes: tuple[str, ...] | None = None
    label_map: Mapping[str, str] | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names by class id: ``classes``, or the label map's names in id order (empty when neither)."""
        if self.classes is not None:
            return self.classes
        return tuple(self.label_map.values()) if self.label_map else ()

    def require(self, kind: str, where: str = "metadata.json") -> DatasetMetadata:
        """Self, when it holds what a dataset of ``kind`` needs (image: normalization and classes; text: a
        label map); :class:`ContractError` naming what is missing otherwise."""
        if kind == "image":
            self.require_normalization(where)
            if self.classes is None:
                check_classes(None, where)
        elif kind == "text":
            self.require_label_map(where)
        else:
            raise ContractError(f"unknown dataset kind {kind!r}: expected 'image' or 'text'")
        return self

    def require_normalization(self, where: str = "metadata.json") -> Normalization:
        """The normalization (an image dataset's metadata has one); :class:`ContractError` otherwise."""
        return self.normalization if self.normalization is not None else check_normalization(None, where)

    def require_label_map(self, where: str = "metadata.json") -> dict[str, str]:
        """The label map (a text dataset's metadata has one); :class:`ContractError` otherwise."""
        return dict(self.label_map if self.label_map is not None else check_label_map(None, where))


def parse_metadata(source: str | bytes | Mapping[str, Any], where: str = "metadata.json") -> DatasetMetadata:
    """Parse and check a ``metadata.json`` (its text or the decoded object). Every field the contract names
    that is present is checked with its one rule; :meth:`DatasetMetadata.require` says what a kind needs."""
    if isinstance(source, str | bytes):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ContractError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(source, Mapping):
        raise ContractError(f"{where} must be a JSON object, got {type(source).__name__}")
    return DatasetMetadata(
        raw=dict(source),
        normalization=(check_normalization(source["normalization"], where) if "normalization" in source
                       else None),
        classes=check_classes(source["classes"], where) if "classes" in source else None,
        label_map=check_label_map(source["label_map"], where) if "label_map" in source else None,
    )


# --- one dataset version, as it passes between assets ------------------------------------------------------


@dataclass(frozen=True)
class SplitFile:
    """One DVC-tracked split of a version: its registry path, its URL in the DVC remote, its md5 and size."""

    path: str
    url: str
    md5: str
    size: int


@dataclass(frozen=True)
class DatasetVersion:
    """A registry version as the dataset asset resolved it: tag, commit, the split files and the checked
    metadata. What the preprocessing, training and search steps consume."""

    registry_tag: str
    commit: str
    files: Mapping[str, SplitFile]
    metadata: DatasetMetadata

    @property
    def dataset(self) -> str:
        return parse_tag(self.registry_tag)[0]

    @property
    def version(self) -> str:
        return parse_tag(self.registry_tag)[1]

    @property
    def content_md5(self) -> str:
        """The DVC md5s of the splits (:data:`SPLITS` order): identical content under another tag gives the
        same value."""
        return "+".join(self.files[split].md5 for split in SPLITS)

    def url(self, split: str) -> str:
        """The split's URL in the DVC remote (what Ray Data reads)."""
        return self.files[split].url


# --- rows ---------------------------------------------------------------------------------------------------


def text_key(text: str) -> str:
    """The key texts are compared by: whitespace collapsed, case-folded."""
    return " ".join(str(text).split()).casefold()


def row_keys(table: Any) -> list[Any]:
    """One comparable key per row of a registry table (pyarrow): an image's pixel bytes, a text's
    :func:`text_key`. Identical content gives identical keys, whatever the label."""
    import numpy as np

    if "image" in table.column_names:
        column = table.column("image").combine_chunks()
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8)
        if len(column) == 0:
            return []
        width = len(values) // len(column)
        return [row.tobytes() for row in values.reshape(len(column), width)]
    if "text" in table.column_names:
        return [text_key(t) for t in table.column("text").to_pylist()]
    raise ValueError(f"a registry table has an 'image' or a 'text' column, got {table.column_names}")

"""The registry contract, as one pure vocabulary: tag grammar, split and holdout names, lineage tag names and
how rows are compared. Imports nothing heavy at module level; ``ocm_resources`` may import this module (and
no other part of ``ocm_ml``)."""

from __future__ import annotations

import re
from typing import Any

#: ``<dataset>-v<major>.<minor>.<patch>``: one dataset version.
TAG_RE = re.compile(r"^(?P<dataset>[a-z0-9][a-z0-9._-]*?)-v(?P<version>\d+\.\d+\.\d+)$")
#: The DVC-tracked splits of a version: ``<dataset>/<split>.parquet``.
SPLITS = ("train", "val")
#: The run and model-version tags every ocm training run carries (DESIGN.md, "Contracts").
LINEAGE_TAGS = ("dvc_data_version", "dvc_commit", "dagster_run_id", "dagster_partition", "docker_image_tag",
                "code_version")


def holdout_tag(dataset: str) -> str:
    """The git tag of a dataset's fixed holdout. It does not match :data:`TAG_RE` (not a version)."""
    return f"holdout/{dataset}"


def holdout_path(dataset: str) -> str:
    """Where the holdout lives in the registry (DVC-tracked, same schema as the splits)."""
    return f"holdout/{dataset}.parquet"


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

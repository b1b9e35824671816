"""Learnable synthetic images in the registry schema, for tests and benchmarks (no real data needed).

Class k lights up one 7x7 block (block k of a 4x4 grid) over dim noise, so a ResNet learns it within an epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images as uint8 (n, 784) and int64 labels 0-9 (balanced, shuffled)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 80, size=(n, 28, 28), dtype=np.uint8)
    rows, cols = np.divmod(labels, 4)
    for k in range(10):
        r, c = divmod(k, 4)
        images[(rows == r) & (cols == c), r * 7 : r * 7 + 7, c * 7 : c * 7 + 7] = 220
    return images.reshape(n, 784), labels.astype(np.int64)


def images_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """Registry schema: ``image`` list<uint8> (784 values), ``label`` int64."""
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    offsets = pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32))
    image_column = pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), type=pa.uint8()))
    return pa.table({"image": image_column, "label": pa.array(labels, type=pa.int64())})


def write_synthetic_parquet(path: str | Path, n: int, seed: int = 0, row_group_size: int = 4096) -> str:
    """Write ``n`` synthetic images to a parquet file; returns the path as a string."""
    images, labels = synthetic_images(n, seed)
    pq.write_table(images_table(images, labels), path, row_group_size=row_group_size)
    return str(path)

"""Small, real registries for tests: generated tables published through the real git+DVC publisher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ocm_ml import sources
from ocm_resources.registry import DvcRegistry, RegistryPublisher

CLASSES = list(sources.FASHION_MNIST_CLASSES)
LABEL_MAP = {"0": "negative", "1": "neutral", "2": "positive"}


def image_split(n: int, seed: int) -> sources.ImageSplit:
    """Learnable synthetic images: class k lights up a horizontal band at row 2k+3."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 3 : 2 * k + 6, 4:24] = 230
    return sources.ImageSplit(images, labels)


def image_version(n_train: int = 200, n_val: int = 60, seed: int = 0):
    train, val = image_split(n_train, seed), image_split(n_val, seed + 1)
    mean, std = sources.pixel_stats(train.images)
    metadata = {"normalization": {"mean": mean, "std": std}, "classes": CLASSES}
    return {"train": sources.image_table(train), "val": sources.image_table(val)}, metadata


WORDS = {0: ["awful", "hate", "terrible", "worst"], 1: ["today", "meeting", "report", "train"],
         2: ["love", "great", "happy", "best"]}


def text_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    texts = [" ".join(rng.choice(WORDS[int(k)], size=4)) + f" #{i}" for i, k in enumerate(labels)]
    return pa.Table.from_arrays([pa.array(texts), pa.array(labels.astype(np.int64))],
                                schema=sources.TEXT_SCHEMA)


def text_version(n_train: int = 150, n_val: int = 45, seed: int = 0):
    return {"train": text_table(n_train, seed), "val": text_table(n_val, seed + 1)}, {"label_map": LABEL_MAP}


def new_registry(root: Path) -> tuple[RegistryPublisher, DvcRegistry]:
    pub = RegistryPublisher(root / "registry", remote_dir=root / "dvc-remote")
    pub.init()
    return pub, DvcRegistry(repo_url=str(pub.root))


def publish_holdout(pub: RegistryPublisher, dataset: str = "fashion-mnist", n: int = 120, seed: int = 99):
    """A synthetic holdout of the same kind as the generated versions (no row can occur in their splits)."""
    if dataset == "fashion-mnist":
        table = sources.image_table(image_split(n, seed))
    else:
        texts = text_table(n, seed)
        table = texts.set_column(0, "text",
                                 pa.array([f"{t} (held out)" for t in texts.column("text").to_pylist()]))
    return pub.publish_holdout(dataset, table)

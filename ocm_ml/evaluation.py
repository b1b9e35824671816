"""Scoring models on the same rows, streamed: accuracy, macro-F1, per-class accuracy, the confusion matrix,
expected calibration error and latency per batch. Pure: no Dagster, no MLflow, no registry.

>>> scores = score_stream(bundle.predict, batches, class_names)    # batches: (inputs, label ids) pairs
>>> scores.accuracy, scores.macro_f1, scores.per_class_accuracy
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: Metrics of :class:`Scores` that the promotion gate may name.
METRICS = ("accuracy", "macro_f1", "ece")


@dataclass(frozen=True)
class Scores:
    """One model on one set of rows."""

    rows: int
    accuracy: float
    macro_f1: float
    ece: float
    per_class_accuracy: list[float]
    per_class_f1: list[float]
    confusion: list[list[int]]
    latency_ms_per_batch: float
    batch_size: int
    class_names: list[str] = field(default_factory=list)

    def metric(self, name: str) -> float:
        if name not in METRICS:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scores:
        return cls(**data)


class _Accumulator:
    def __init__(self, num_classes: int):
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.bin_conf = np.zeros(ECE_BINS)
        self.bin_correct = np.zeros(ECE_BINS)
        self.bin_count = np.zeros(ECE_BINS, dtype=np.int64)
        self.batch_seconds: list[float] = []

    def add(self, truth: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, seconds: float) -> None:
        n = self.confusion.shape[0]
        if len(truth) != len(predicted) or len(truth) != len(confidence):
            raise ValueError(f"{len(truth)} labels but {len(predicted)} predictions and "
                             f"{len(confidence)} confidences")
        bad = (truth < 0) | (truth >= n) | (predicted < 0) | (predicted >= n)
        if bad.any():
            raise ValueError(f"class ids must lie in 0..{n - 1}; got labels/predictions outside it")
        np.add.at(self.confusion, (truth, predicted), 1)
        conf = np.clip(confidence.astype(np.float64), 0.0, 1.0)
        bins = np.minimum((conf * ECE_BINS).astype(np.int64), ECE_BINS - 1)
        np.add.at(self.bin_conf, bins, conf)
        np.add.at(self.bin_correct, bins, (truth == predicted).astype(np.float64))
        np.add.at(self.bin_count, bins, 1)
        self.batch_seconds.append(seconds)

    def scores(self, batch_size: int, class_names: Sequence[str]) -> Scores:
        cm = self.confusion
        rows = int(cm.sum())
        if rows == 0:
            raise ValueError("no rows were scored")
        tp = np.diag(cm).astype(np.float64)
        support = cm.sum(axis=1).astype(np.float64)
        predicted = cm.sum(axis=0).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(support > 0, tp / support, np.nan)
            precision = np.where(predicted > 0, tp / predicted, 0.0)
            f1 = np.where(precision + np.nan_to_num(recall) > 0,
                          2 * precision * np.nan_to_num(recall) / (precision + np.nan_to_num(recall)), 0.0)
        present = support > 0  # macro-F1 over the classes that occur in these rows
        nonempty = self.bin_count > 0
        ece = float(np.sum(np.abs(self.bin_correct[nonempty] - self.bin_conf[nonempty])) / rows)
        return Scores(
            rows=rows,
            accuracy=float(tp.sum() / rows),
            macro_f1=float(f1[present].mean()),
            ece=ece,
            per_class_accuracy=[float(x) if math.isfinite(x) else float("nan") for x in recall],
            per_class_f1=[float(x) for x in f1],
            confusion=cm.tolist(),
            latency_ms_per_batch=float(np.median(self.batch_seconds) * 1000.0),
            batch_size=batch_size,
            class_names=list(class_names),
        )


def score_stream(
    predict: Callable[[Any], tuple[Sequence[Any], Sequence[float]]],
    batches: Iterable[tuple[Any, np.ndarray]],
    class_names: Sequence[str],
    *,
    to_ids: Callable[[Sequence[Any]], np.ndarray] | None = None,
    batch_size: int = 256,
) -> Scores:
    """Score ``predict`` (inputs -> (predictions, confidences)) on ``batches`` of (inputs, true label ids),
    one batch in memory at a time. ``to_ids`` maps predictions to class ids (e.g. label names for texts).
    ``batch_size`` re-chunks the stream so that the latency per batch means the same for every model."""
    acc = _Accumulator(len(class_names))
    for inputs, labels in _rechunk(batches, batch_size):
        start = time.perf_counter()
        predicted, confidence = predict(inputs)
        seconds = time.perf_counter() - start
        ids = to_ids(predicted) if to_ids is not None else np.asarray(predicted, dtype=np.int64)
        acc.add(np.asarray(labels, dtype=np.int64), np.asarray(ids, dtype=np.int64),
                np.asarray(confidence, dtype=np.float64), seconds)
    return acc.scores(batch_size, class_names)


def _rechunk(batches: Iterable[tuple[Any, np.ndarray]], size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for inputs, labels in batches:
        for start in range(0, len(labels), size):
            yield inputs[start : start + size], labels[start : start + size]


def arrow_batches(record_batches: Iterable[Any], kind: str, limit: int | None = None,
                  total: int | None = None):
    """(inputs, label ids) per pyarrow record batch of a registry table: images as float32 (N, 784) pixels
    in 0-255, texts as a list of strings. With ``limit``, at most that many rows, spread evenly over the
    ``total`` rows of the table (every k-th row: a split stored in label order still gives every label);
    without ``total``, the first ``limit`` rows."""
    stride = max(1, total // limit) if limit and total else 1
    seen = offset = 0
    for batch in record_batches:
        if limit is not None and seen >= limit:
            return
        if stride > 1:
            first = (-offset) % stride
            offset += batch.num_rows
            batch = batch.take(np.arange(first, batch.num_rows, stride))
        if limit is not None:
            batch = batch.slice(0, limit - seen)
        seen += batch.num_rows
        if batch.num_rows == 0:
            continue
        labels = np.asarray(batch.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
        if kind == "image":
            column = batch.column("image")
            flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            yield flat.reshape(len(labels), -1), labels
        else:
            yield batch.column("text").to_pylist(), labels


def evaluate(
    models: dict[str, Any],
    streams: dict[str, Callable[[], Iterable[tuple[Any, np.ndarray]]]],
    class_names: Sequence[str],
    *,
    kind: str,
    batch_size: int,
) -> dict[str, dict[str, Scores]]:
    """Score every model (``predict(inputs) -> (predictions, confidences)``) on every stream (a callable that
    opens the stream anew, so each model reads the same rows). Text predictions are label names."""
    index = {name: i for i, name in enumerate(class_names)}

    def to_ids(predicted: Sequence[Any]) -> np.ndarray:
        if kind == "image":
            return np.asarray(predicted, dtype=np.int64)
        unknown = sorted({str(p) for p in predicted} - set(index))
        if unknown:
            raise ValueError(f"the model answered labels {unknown[:5]} that the label map does not name")
        return np.asarray([index[str(p)] for p in predicted], dtype=np.int64)

    return {
        label: {split: score_stream(predict, open_stream(), class_names, to_ids=to_ids, batch_size=batch_size)
                for split, open_stream in streams.items()}
        for label, predict in models.items()
    }


def majority_accuracy(train_label_counts: dict[int, int], rows_labels: dict[int, int]) -> float:
    """Accuracy on rows with label counts ``rows_labels`` of always answering the training split's most
    frequent class."""
    if not train_label_counts or not rows_labels:
        return float("nan")
    majority = max(sorted(train_label_counts), key=lambda k: train_label_counts[k])
    return rows_labels.get(majority, 0) / sum(rows_labels.values())


def comparison_markdown(results: dict[str, dict[str, Scores]], splits: Sequence[str]) -> str:
    """One table, a row per (model, split): rows, accuracy, macro-F1, ECE, latency, then per-class
    accuracy."""
    any_scores = next(s for per in results.values() for s in per.values())
    names = any_scores.class_names
    head = ("| model | rows | accuracy | macro-F1 | ECE | ms/batch | "
            + " | ".join(_short(n) for n in names) + " |")
    rule = "|" + "---|" * (6 + len(names))
    lines = [head, rule]
    for split in splits:
        for label, per in results.items():
            s = per.get(split)
            if s is None:
                continue
            classes = " | ".join("-" if not math.isfinite(a) else f"{a:.3f}" for a in s.per_class_accuracy)
            lines.append(f"| {label} on {split} | {s.rows} | {s.accuracy:.4f} | {s.macro_f1:.4f} | "
                         f"{s.ece:.4f} | {s.latency_ms_per_batch:.1f} (b={s.batch_size}) | {classes} |")
    return "\n".join(lines)


def _short(name: str) -> str:
    return name if len(name) <= 10 else name[:9] + "…"


#: The text reference model every text evaluation scores: its name in ``baselines`` and in the gate.
TFIDF_LR = "tfidf_lr"


class TfidfLogisticRegression:
    """TF-IDF of word 1-2-grams (sublinear tf, terms in >= 2 texts) + multinomial logistic regression, fitted
    on a training split in seconds: the reference a text model must beat to be worth serving.

    >>> ref = TfidfLogisticRegression.fit(train_texts, train_label_ids, class_names)
    >>> ref.predict(["what a great day"])       # (label names, confidences), like a model bundle
    (['positive'], [0.81])
    """

    def __init__(self, vectorizer, classifier, class_names: Sequence[str]):
        self.vectorizer, self.classifier, self.class_names = vectorizer, classifier, list(class_names)

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], class_names: Sequence[str], *, C: float = 1.0,
            seed: int = 0) -> TfidfLogisticRegression:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(y) or len(texts) == 0:
            raise ValueError(f"TF-IDF baseline: {len(texts)} texts and {len(y)} labels; need as many, > 0")
        if len(np.unique(y)) < 2:
            raise ValueError("TF-IDF baseline: the training split has a single label; nothing to fit")
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                     min_df=2 if len(texts) >= 100 else 1)
        features = vectorizer.fit_transform([str(t) for t in texts])
        classifier = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(features, y)
        return cls(vectorizer, classifier, class_names)

    def predict(self, texts: Sequence[str]) -> tuple[list[str], list[float]]:
        proba = self.classifier.predict_proba(self.vectorizer.transform([str(t) for t in texts]))
        ids = self.classifier.classes_[proba.argmax(axis=1)]
        return [self.class_names[int(i)] for i in ids], proba.max(axis=1).tolist()

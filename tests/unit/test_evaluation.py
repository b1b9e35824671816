"""The streamed scorer: figures that can be checked by hand, and a row limit that samples every label."""

import numpy as np
import pyarrow as pa
import pytest

from ocm_ml.evaluation import arrow_batches, score_stream


def test_scores_by_hand():
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    conf = np.array([0.9, 0.6, 0.8, 0.7, 0.95, 0.55])
    scores = score_stream(lambda x: (predicted[x], conf[x]), [(np.arange(6), truth)], ["a", "b", "c"],
                          batch_size=4)
    assert scores.rows == 6 and scores.accuracy == pytest.approx(4 / 6)
    assert scores.per_class_accuracy == [0.5, 1.0, 0.5]
    assert scores.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # F1 per class: a 0.5, b 0.8, c 2/3
    assert scores.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # ECE: |correct - confidence| summed per bin over all rows
    assert 0.0 < scores.ece < 1.0
    assert len(scores.confusion) == 3 and scores.batch_size == 4


def test_a_constant_predictor_scores_the_majority_share():
    truth = np.array([0] * 7 + [1] * 3)
    scores = score_stream(lambda x: (np.zeros(len(x), dtype=int), np.ones(len(x))), [(np.arange(10), truth)],
                          ["a", "b"])
    assert scores.accuracy == pytest.approx(0.7) and scores.per_class_accuracy == [1.0, 0.0]
    assert scores.ece == pytest.approx(0.3)  # always sure, right 70 % of the time


def test_a_row_limit_spreads_over_a_split_in_label_order():
    table = pa.table({"text": [f"t{i}" for i in range(300)], "label": [i // 100 for i in range(300)]})
    batches = table.to_batches(max_chunksize=64)
    first = [labels for _, labels in arrow_batches(iter(batches), "text", limit=30)]
    spread = [labels for _, labels in arrow_batches(iter(batches), "text", limit=30, total=300)]
    assert set(np.concatenate(first)) == {0}
    labels = np.concatenate(spread)
    assert len(labels) == 30 and np.bincount(labels).tolist() == [10, 10, 10]


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="class ids must lie in 0..1"):
        score_stream(lambda x: (np.array([5]), np.array([1.0])), [(np.arange(1), np.array([0]))], ["a", "b"])


def test_tfidf_baseline_fits_and_answers_label_names():
    from ocm_ml.evaluation import TfidfLogisticRegression

    words = {0: "awful terrible hate", 1: "table report tuesday", 2: "great love happy"}
    texts = [f"{words[i % 3].split()[i % 2]} day {i}" for i in range(120)]
    labels = [i % 3 for i in range(120)]
    ref = TfidfLogisticRegression.fit(texts, labels, ["negative", "neutral", "positive"])
    names, conf = ref.predict(["awful day", "great day", "table day"])
    assert names == ["negative", "positive", "neutral"] and all(0.33 < c <= 1.0 for c in conf)
    with pytest.raises(ValueError, match="single label"):
        TfidfLogisticRegression.fit(["a b", "c d"], [1, 1], ["x", "y"])

"""The text endpoint over real HTTP: contract, label map from the data version, bad inputs."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest

from ocm_ml.serve.loading import normalize_text_output
from tests.serve.conftest import LABEL_MAP, TEXT_MODEL


def test_text_contract(text_url):
    info = httpx.get(f"{text_url}/info", timeout=30).json()
    assert info["label_map"] == LABEL_MAP and info["data_version"] == "tweet-sentiment-v1.0.0"
    assert info["model_version"] == "1"
    r = httpx.post(f"{text_url}/predict", json={"texts": ["a good day", "rain again"]}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions", "model_uri", "data_version"}
    assert body["model_uri"] == f"models:/{TEXT_MODEL}/1" and body["data_version"] == "tweet-sentiment-v1.0.0"
    assert body["predictions"] == [
        {"text": "a good day", "label": "positive", "confidence": pytest.approx(0.9)},
        {"text": "rain again", "label": "negative", "confidence": pytest.approx(0.6)},
    ]


@pytest.mark.parametrize(
    "payload, words",
    [
        ({"texts": []}, "is empty"),
        ({"texts": ["ok", 1]}, "texts[1] is the number 1"),
        ({"texts": [""]}, "texts[0] is empty"),
        ({"texts": ["x" * 51]}, "at most 50"),
        ({"texts": ["a"] * 17}, "at most 16"),
        ({"texts": "good"}, "must be a list"),
        ({"images": [[0] * 784]}, "missing field 'texts'"),
    ],
)
def test_text_bad_inputs(text_url, payload, words):
    r = httpx.post(f"{text_url}/predict", json=payload, timeout=30)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_output_shapes_of_text_models():
    label_map = {"0": "negative", "2": "positive"}
    # What ocm_ml.text.pyfunc returns: names already.
    df = pd.DataFrame({"text": ["a"], "label": ["positive"], "confidence": [0.8]})
    assert normalize_text_output(df, 1, label_map) == (["positive"], [0.8])
    assert normalize_text_output([{"label_id": 0, "score": 0.7}], 1, label_map) == (["negative"], [0.7])
    assert normalize_text_output([[0.1, 0.2, 0.7]], 1, label_map) == (["positive"], [pytest.approx(0.7)])

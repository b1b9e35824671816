"""The image endpoint over real HTTP through a real local Ray Serve: contract, bad inputs, direct ingress."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import CLASSES, IMAGE_APP, IMAGE_MODEL


def image(first_pixel: float = 100.0, square: bool = False) -> list:
    flat = [first_pixel] + [0.0] * 783
    return [flat[r * 28 : (r + 1) * 28] for r in range(28)] if square else flat


def test_root_health_info(image_url):
    root = httpx.get(f"{image_url}/", timeout=30).json()
    assert set(root) == {"service", "version", "status", "docs", "health"}
    assert root["docs"] == f"/{IMAGE_APP}/docs" and root["health"] == f"/{IMAGE_APP}/health"
    assert httpx.get(f"{image_url}/docs", timeout=30).status_code == 200

    health = httpx.get(f"{image_url}/health", timeout=30).json()
    assert health["status"] == "healthy" and health["model_loaded"] is True
    assert health["model_uri"] == f"models:/{IMAGE_MODEL}/1"
    assert health["uptime_seconds"] > 0

    info = httpx.get(f"{image_url}/info", timeout=30).json()
    assert info["model_uri"] == f"models:/{IMAGE_MODEL}/1"
    assert info["model_version"] == "1" and info["run_id"]
    assert info["data_version"] == "fashion-mnist-v1.0.0" and info["dataset"] == "fashion-mnist"
    assert info["normalization_params"] == {"mean": 0.5, "std": 0.25}  # from that DVC version's metadata
    assert info["output_classes"] == CLASSES
    assert info["dvc_commit"] and info["dagster_run_id"] == "dagster-image-v1" and info["training_time"]
    assert len(info["metadata_md5"]) == 32
    assert info["serving"]["max_batch"] == 1000


@pytest.mark.parametrize("n", [1, 32, 1000])
def test_predict_batches(image_url, n):
    # pixel 0 = 100 normalizes to (100/255 - 0.5) / 0.25 < 0, so class 1; pixel 0 = 255 gives class 0.
    images = [image(100.0, square=i % 2 == 1) if i % 3 else image(255.0) for i in range(n)]
    r = httpx.post(f"{image_url}/predict", json={"images": images}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions", "model_uri", "data_version", "timestamp", "processing_time_ms"}
    assert body["model_uri"] == f"models:/{IMAGE_MODEL}/1"
    assert body["data_version"] == "fashion-mnist-v1.0.0"
    assert body["processing_time_ms"] > 0 and body["timestamp"].endswith("+00:00")
    assert len(body["predictions"]) == n
    for i, p in enumerate(body["predictions"]):
        want = 1 if i % 3 else 0
        assert p["class_id"] == want and p["class_name"] == CLASSES[want]
        assert 0 < p["confidence"] <= 1


BAD_BODIES = [
    ("wrong shape", {"images": [[0.0] * 783]}, 422, "783 values"),
    ("28x27", {"images": [[[0.0] * 27] * 28]}, 422, "has 27 values"),
    ("not wrapped", {"images": [0.0] * 784}, 422, "flat list of 784"),
    ("out of range", {"images": [[300.0] + [0.0] * 783]}, 422, "outside 0-255"),
    ("negative", {"images": [[-0.5] + [0.0] * 783]}, 422, "outside 0-255"),
    ("string pixel", {"images": [["12"] + [0.0] * 783]}, 422, "is a string"),
    ("null pixel", {"images": [[None] + [0.0] * 783]}, 422, "is null"),
    ("bool pixel", {"images": [[1, True] + [0.0] * 782]}, 422, "is a boolean"),
    ("empty", {"images": []}, 422, "is empty"),
    ("images not a list", {"images": {"a": 1}}, 422, "must be a list"),
    ("missing field", {"pixels": [[0] * 784]}, 422, "missing field 'images'"),
    ("top-level list", [[0] * 784], 422, "must be a JSON object"),
    ("over the cap", {"images": [[0] * 784] * 1001}, 422, "at most 1000"),
]


@pytest.mark.parametrize("name, payload, status, words", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_with_a_message(image_url, name, payload, status, words):
    r = httpx.post(f"{image_url}/predict", json=payload, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize(
    "content, headers, status, words",
    [
        (b'{"images": [[0, 0', {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"", {"content-type": "application/json"}, 400, "empty"),
        (b'{"images": [[NaN' + b", 0" * 783 + b"]]}", {"content-type": "application/json"}, 422, "NaN"),
        (b'{"images": [[Infinity' + b", 0" * 783 + b"]]}", {"content-type": "application/json"}, 422,
         "Infinity"),
        (b"images=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        (json.dumps({"images": [[0] * 784]}).encode(), {"content-type": "text/plain"}, 415, "Content-Type"),
    ],
)
def test_bad_raw_bodies(image_url, content, headers, status, words):
    r = httpx.post(f"{image_url}/predict", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_service_still_answers_after_bad_inputs(image_url):
    for _, payload, _, _ in BAD_BODIES[:5]:
        httpx.post(f"{image_url}/predict", json=payload, timeout=30)
    r = httpx.post(f"{image_url}/predict", json={"images": [image(255.0)]}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["class_id"] == 0
    assert httpx.get(f"{image_url}/health", timeout=30).status_code == 200


def test_wrong_method_and_path(image_url):
    assert httpx.get(f"{image_url}/predict", timeout=30).status_code == 405
    assert httpx.get(f"{image_url}/nope", timeout=30).status_code == 404


def test_direct_ingress_serves_the_same_contract(image_url):
    from ocm_resources.serve_control import ServeControl

    urls = ServeControl(address=None).urls(IMAGE_APP)
    assert urls["proxy"] == image_url
    assert urls["direct"], "the test cluster runs with RAY_SERVE_THROUGHPUT_OPTIMIZED=1"
    r = httpx.post(f"{urls['direct'][0]}/predict", json={"images": [image(255.0)]}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["class_name"] == CLASSES[0]

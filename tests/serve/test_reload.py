"""Hot reload on a live Serve app: no failed request while the model swaps, /info shows the new lineage after,
a bad reload keeps the old model and is rolled back."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.conftest import IMAGE_APP, IMAGE_MODEL, reconfigure, wait_healthy

PIXEL_255 = {"images": [[255.0] + [0.0] * 783]}


def _hammer(url: str, stop: threading.Event, results: list) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                r = client.post(f"{url}/predict", json=PIXEL_255)
                body = r.json() if r.status_code == 200 else None
                results.append((r.status_code, body["model_uri"] if body else r.text,
                                body["predictions"][0]["class_id"] if body else None))
            except httpx.HTTPError as exc:
                results.append((0, repr(exc), None))


def test_hot_reload_under_load(image_url, serve_env):
    from ocm_resources.serve_control import ServeControl

    endpoint_urls = ServeControl(address=None).urls
    before = endpoint_urls(IMAGE_APP)
    replica_before = httpx.get(f"{image_url}/info", timeout=30).json()["serving"]["replica_id"]
    stop, results, direct_results = threading.Event(), [], []
    clients = [threading.Thread(target=_hammer, args=(image_url, stop, results)),
               threading.Thread(target=_hammer, args=(before["direct"][0], stop, direct_results))]
    for c in clients:
        c.start()
    try:
        time.sleep(1.0)
        status = reconfigure(IMAGE_APP, {"model_uri": f"models:/{IMAGE_MODEL}/2"})
        time.sleep(1.0)
    finally:
        stop.set()
        for c in clients:
            c.join()

    assert status["model_version"] == "2" and status["last_reload_error"] is None
    everything = results + direct_results
    failures = [r for r in everything if r[0] != 200]
    assert not failures, failures[:5]
    served = {uri for _, uri, _ in everything}
    assert served == {f"models:/{IMAGE_MODEL}/1", f"models:/{IMAGE_MODEL}/2"}, served
    # Every answer comes from the model it names: v1 says class 0 for this image, v2 always class 7.
    for _, uri, class_id in everything:
        assert class_id == (0 if uri.endswith("/1") else 7)
    assert everything[-1][1].endswith("/2")

    info = httpx.get(f"{image_url}/info", timeout=30).json()
    assert info["model_uri"] == f"models:/{IMAGE_MODEL}/2" and info["model_version"] == "2"
    assert info["data_version"] == "fashion-mnist-v1.1.0"
    assert info["normalization_params"] == {"mean": 0.25, "std": 0.5}
    assert httpx.get(f"{image_url}/health", timeout=30).json()["model_uri"] == f"models:/{IMAGE_MODEL}/2"
    # In place: same replica, same direct-ingress port.
    assert info["serving"]["replica_id"] == replica_before
    assert endpoint_urls(IMAGE_APP) == before

    # Back to v1 for the other tests, through an alias this time.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=serve_env.tracking_uri, registry_uri=serve_env.tracking_uri)
    client.set_registered_model_alias(IMAGE_MODEL, "champion", "1")
    status = reconfigure(IMAGE_APP, {"model_uri": f"models:/{IMAGE_MODEL}@champion"})
    assert status["model_version"] == "1"
    assert httpx.get(f"{image_url}/info", timeout=30).json()["model_version"] == "1"
    # The alias moves: the same URI reloads to what it names now.
    client.set_registered_model_alias(IMAGE_MODEL, "champion", "2")
    assert reconfigure(IMAGE_APP, {"model_uri": f"models:/{IMAGE_MODEL}@champion",
                                         "max_batch": 999})["model_version"] == "2"
    # Leave the session's app as the other tests expect it.
    reconfigure(IMAGE_APP, {"model_uri": f"models:/{IMAGE_MODEL}/1", "max_batch": 1000})


def test_failed_reload_keeps_serving_and_rolls_back(image_url):
    from ocm_resources.serve_control import ReloadError

    uri = httpx.get(f"{image_url}/health", timeout=30).json()["model_uri"]
    with pytest.raises(ReloadError, match="99"):
        reconfigure(IMAGE_APP, {"model_uri": f"models:/{IMAGE_MODEL}/99"}, timeout_s=120)
    health = wait_healthy(image_url)
    assert health["model_uri"] == uri
    r = httpx.post(f"{image_url}/predict", json=PIXEL_255, timeout=30)
    assert r.status_code == 200 and r.json()["model_uri"] == uri
    with pytest.raises(ValueError, match="unknown user_config key"):
        reconfigure(IMAGE_APP, {"modle_uri": "typo"})

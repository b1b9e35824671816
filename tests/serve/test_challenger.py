"""Canary and shadow: a challenger model in the live replicas, switched on and off by hot reconfigure."""

from __future__ import annotations

import time

import httpx

from tests.serve.conftest import IMAGE_APP, IMAGE_MODEL, reconfigure

PIXEL_255 = {"images": [[255.0] + [0.0] * 783]}  # v1 answers class 0, v2 always class 7
V1, V2 = f"models:/{IMAGE_MODEL}/1", f"models:/{IMAGE_MODEL}/2"


def answers(url: str, n: int) -> list[tuple[str, int]]:
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            r = client.post(f"{url}/predict", json=PIXEL_255)
            assert r.status_code == 200, r.text
            body = r.json()
            out.append((body["model_uri"], body["predictions"][0]["class_id"]))
    return out


def challenger_info(url: str) -> dict | None:
    return httpx.get(f"{url}/info", timeout=30).json()["serving"].get("challenger")


def test_canary_then_shadow_then_off(image_url):
    try:
        reconfigure(IMAGE_APP, {"model_uri": V1, "challenger_uri": V2, "challenger_mode": "canary",
                                      "challenger_share": 1.0})
        assert set(answers(image_url, 5)) == {(V2, 7)}  # the answer names the model that gave it
        # the champion is still v1
        assert httpx.get(f"{image_url}/health", timeout=30).json()["model_uri"] == V1
        info = challenger_info(image_url)
        assert info["mode"] == "canary" and info["model_version"] == "2" and info["canary_requests"] >= 5

        reconfigure(IMAGE_APP, {"challenger_share": 0.5})
        assert {uri for uri, _ in answers(image_url, 40)} == {V1, V2}

        reconfigure(IMAGE_APP, {"challenger_mode": "shadow"})
        assert set(answers(image_url, 10)) == {(V1, 0)}  # shadow answers are never returned
        deadline = time.monotonic() + 30
        while (info := challenger_info(image_url))["shadow_items"] < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert info["shadow_items"] >= 10 and info["shadow_agreement"] == 0.0 and info["shadow_errors"] == 0
    finally:
        reconfigure(IMAGE_APP, {"model_uri": V1, "challenger_uri": None, "challenger_mode": "canary",
                                      "challenger_share": 0.0})
    assert challenger_info(image_url) is None
    assert set(answers(image_url, 3)) == {(V1, 0)}

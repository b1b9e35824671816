"""Drift statistics (ocm_ml.drift) on the synthetic images and texts the other tests use, and the
served_traffic definitions in the code location."""

from __future__ import annotations

import numpy as np
import pytest

from ocm_ml import drift
from tests.registry_helpers import image_split, text_table

T = drift.DriftThresholds()


def _pixels(n: int, seed: int) -> np.ndarray:
    return image_split(n, seed).images.reshape(n, -1).astype(np.float32)


def test_psi_and_ks_by_hand():
    same = np.arange(1000, dtype=float)
    assert drift.psi(same, same) == pytest.approx(0.0, abs=1e-9)
    assert drift.ks(same, same) == (0.0, 1.0)
    # half the mass moves from the lower to the upper half: shares 0.5/0.5 -> 0.25/0.75 in two bins
    ref = np.r_[np.zeros(500), np.ones(500)]
    cur = np.r_[np.zeros(250), np.ones(750)]
    expected = (0.25 - 0.5) * np.log(0.25 / 0.5) + (0.75 - 0.5) * np.log(0.75 / 0.5)
    assert drift.psi(ref, cur, bins=2) == pytest.approx(expected, rel=1e-3)
    stat, p = drift.ks(ref, cur)
    assert stat == pytest.approx(0.25)
    assert p < 1e-6
    with pytest.raises(ValueError, match="finite value"):
        drift.psi(np.array([np.nan]), same)


def test_image_summaries():
    pixels = np.zeros((2, 784), dtype=np.float32)
    pixels[1, :392] = 255
    s = drift.summarize_images(pixels)
    assert s["pixel_mean"].tolist() == [0.0, 0.5]
    assert s["pixel_std"][1] == pytest.approx(0.5)
    assert s["hist_00"].tolist() == [1.0, 0.5] and s["hist_15"].tolist() == [0.0, 0.5]
    assert sum(s[f"hist_{i:02d}"][1] for i in range(16)) == pytest.approx(1.0)


def test_same_distribution_passes_and_shifted_images_fail():
    ref = drift.summarize_images(_pixels(400, 0))
    own = drift.input_drift(ref, drift.summarize_images(_pixels(300, 1)), T)
    assert own["passed"], own["drifted"]
    assert own["max_psi"] < T.psi
    inverted = drift.input_drift(ref, drift.summarize_images(255 - _pixels(300, 1)), T)
    assert not inverted["passed"] and "pixel_mean" in inverted["drifted"]
    rng = np.random.default_rng(5)
    noisy = np.clip(_pixels(300, 1) + rng.normal(0, 60, size=(300, 784)), 0, 255)
    report = drift.input_drift(ref, drift.summarize_images(noisy), T)
    assert not report["passed"] and "pixel_std" in report["drifted"]
    few = drift.input_drift(ref, drift.summarize_images(255 - _pixels(10, 1)), T)
    assert few["passed"] and not few["enough_rows"]  # too few rows: not judged


def test_texts_of_another_language_drift():
    train = text_table(400, 0).column("text").to_pylist()
    vocab = {t for text in train for t in drift.tokens(text)}
    ref = drift.summarize_texts(train, vocab)
    own = drift.input_drift(ref, drift.summarize_texts(text_table(200, 1).column("text").to_pylist(), vocab),
                            T)
    assert own["passed"], own
    other = [f"das wetter ist heute wirklich sehr schlecht gewesen nummer {i}" for i in range(200)]
    shifted = drift.input_drift(ref, drift.summarize_texts(other, vocab), T)
    assert not shifted["passed"]
    assert {"oov_share", "token_count"} <= set(shifted["drifted"])
    assert drift.summarize_texts(["hello"])["oov_share"].tolist() != [0.0]  # NaN without a vocabulary


def test_prediction_drift_and_confidence_collapse():
    rng = np.random.default_rng(0)
    holdout = [str(x) for x in rng.integers(0, 10, 600)]
    served = [str(x) for x in rng.integers(0, 10, 600)]
    assert drift.prediction_drift(holdout, served, T)["passed"]
    one_class = drift.prediction_drift(holdout, ["7"] * 600, T)
    assert not one_class["passed"] and one_class["served_shares"]["7"] == 1.0
    assert drift.confidence_collapse(rng.uniform(0.8, 1.0, 100), T)["passed"]
    collapsed = drift.confidence_collapse(rng.uniform(0.1, 0.4, 100), T)
    assert not collapsed["passed"] and collapsed["low_confidence_share"] == 1.0


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="psi must be > 0"):
        drift.DriftThresholds(psi=0)
    with pytest.raises(ValueError, match="within 0-1"):
        drift.DriftThresholds(min_mean_confidence=2)


def test_served_traffic_is_in_the_code_location():
    import dagster as dg

    from ocm_assets.build import build_definitions
    from ocm_assets.families import FAMILIES
    from ocm_assets.monitoring import served_traffic_key

    defs = build_definitions()  # the embedded default resources (nothing is started)
    repo = defs.get_repository_def()
    for fam in FAMILIES:
        node = repo.asset_graph.get(served_traffic_key(fam))
        assert isinstance(node.partitions_def, dg.HourlyPartitionsDefinition)
        checks = {k.name for k in repo.asset_graph.get_check_keys_for_assets({served_traffic_key(fam)})}
        assert checks == {"input_drift", "prediction_drift", "confidence_collapse"}
        assert repo.get_sensor_def(f"{fam.name}_drift_retrain_sensor").job_name == fam.retrain_job_name
        assert repo.has_sensor_def(f"{fam.name}_alert_sensor")
        assert repo.has_schedule_def(f"{fam.name}_served_traffic_hourly")


def test_prediction_log_setting_has_one_home(monkeypatch, tmp_path):
    from ocm_resources import env

    monkeypatch.setenv("OCM_HOME", str(tmp_path))
    monkeypatch.delenv("OCM_PREDICTION_LOG", raising=False)
    store = env.prediction_log_store("local")
    assert store.root == str(tmp_path / "prediction_log")
    assert store.replica_settings("fashion_mnist")["family"] == "fashion_mnist"
    assert store.metrics_url == "http://127.0.0.1:8080/metrics"
    monkeypatch.setenv("OCM_CHECKPOINT_PATH", "s3://team-bucket/ray")
    assert env.prediction_log_store("cluster").root == "s3://team-bucket/prediction_log"
    monkeypatch.setenv("OCM_PREDICTION_LOG", "off")
    assert env.prediction_log_store("local").replica_settings("x") is None
    monkeypatch.setenv("OCM_PREDICTION_LOG", "")
    monkeypatch.setenv("OCM_PREDICTION_LOG_SAMPLE_RATE", "lots")
    with pytest.raises(env.ConfigurationError, match="OCM_PREDICTION_LOG_SAMPLE_RATE"):
        env.prediction_log_store("local")


def test_cluster_monitors_scrape_every_ray_pod_of_ocm():
    from pathlib import Path

    import yaml

    docs = list(yaml.safe_load_all(
        (Path(__file__).resolve().parents[1] / "deploy" / "monitoring.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for doc in docs:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["namespace"] == "ocm"
    heads, workers = by_kind["ServiceMonitor"]["spec"], by_kind["PodMonitor"]["spec"]
    # KubeRay's node-type labels cover the training RayCluster and the RayService's cluster alike
    assert heads["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert workers["selector"]["matchLabels"] == {"ray.io/node-type": "worker"}
    assert heads["endpoints"][0]["port"] == workers["podMetricsEndpoints"][0]["port"] == "metrics"
    rules = [r["expr"] for g in by_kind["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    assert any("ray_serve_num_http_error_requests_total" in e for e in rules)


def test_hourly_schedule_checks_the_hour_before_and_carries_retrain_on_drift(monkeypatch):
    from datetime import UTC, datetime

    import dagster as dg

    from ocm_assets.families import FAMILIES
    from ocm_assets.monitoring import build_hourly_check_schedule
    from ocm_resources import env

    fam = FAMILIES[0]
    when = datetime(2026, 12, 3, 14, 10, tzinfo=UTC)
    plain = build_hourly_check_schedule(fam)(dg.build_schedule_context(scheduled_execution_time=when))
    assert plain.partition_key == "2026-12-03-13:00" and plain.run_config == {}
    monkeypatch.setenv("OCM_RETRAIN_ON_DRIFT", "yes")
    schedule = build_hourly_check_schedule(fam, env.retrain_on_drift())
    request = schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert request.run_config["ops"][f"{fam.name}__served_traffic"]["config"] == {"retrain_on_drift": True}
    monkeypatch.setenv("OCM_RETRAIN_ON_DRIFT", "sometimes")
    with pytest.raises(env.ConfigurationError, match="OCM_RETRAIN_ON_DRIFT"):
        env.retrain_on_drift()

"""Dataset and preprocessing assets materialized in-process against a real temporary registry."""

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest

from ocm_assets.data import build_dataset_asset, build_preprocessing_asset, dataset_key, preprocessing_key
from ocm_assets.families import family
from ocm_assets.training import model_key
from ocm_ml import sources
from tests.registry_helpers import LABEL_MAP, image_split, image_version, new_registry, text_version

FASHION = family("fashion_mnist")
TWEETS = family("tweet_sentiment")


def run(fam, registry, tag, instance=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(fam.partitions_name, [tag])
    result = dg.materialize(
        [build_dataset_asset(fam), build_preprocessing_asset(fam)], partition_key=tag,
        resources={"registry": registry}, instance=instance,
        raise_on_error=False,
    )
    mats = {e.asset_key: e.materialization for e in result.get_asset_materialization_events()}
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return result, mats, checks


def meta(mat, key):
    return mat.metadata[key].value


@pytest.fixture(scope="module")
def image_registry(tmp_path_factory):
    pub, reg = new_registry(tmp_path_factory.mktemp("img"))
    tables, metadata = image_version()
    v1 = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    return pub, reg, v1


def test_image_dataset_and_preprocessing(image_registry):
    pub, reg, v1 = image_registry
    result, mats, checks = run(FASHION, reg, v1.tag)
    assert result.success
    ds = mats[dataset_key(FASHION)]
    assert meta(ds, "tag") == v1.tag and meta(ds, "commit") == v1.commit
    md5 = meta(ds, "dvc_md5")
    assert md5["train"] == reg.file_info(v1, "fashion-mnist/train.parquet").md5
    assert meta(ds, "file_urls")["train"].startswith(str(pub.remote_dir))
    assert (meta(ds, "rows_train"), meta(ds, "rows_val")) == (200, 60)
    assert sum(meta(ds, "class_balance_train").values()) == 200
    assert [c.name for c in meta(ds, "dagster/column_schema").columns] == ["image", "label"]
    assert ds.tags["dagster/data_version"] == f"{md5['train']}+{md5['val']}"
    pre = mats[preprocessing_key(FASHION)]
    published = reg.read_metadata(v1).normalization
    assert (meta(pre, "mean") == pytest.approx(published.mean)
            and meta(pre, "std") == pytest.approx(published.std))
    assert checks["schema"].passed and checks["normalization_matches_data"].passed
    assert checks["normalization_matches_data"].metadata["recomputed_mean"].value == pytest.approx(
        published.mean)


def test_data_version_follows_content_not_tag(image_registry):
    pub, reg, v1 = image_registry
    tables, metadata = image_version()  # identical content under a new tag
    same = pub.publish("fashion-mnist", "1.0.1", tables, metadata)
    other_tables, other_meta = image_version(seed=5)
    other = pub.publish("fashion-mnist", "1.0.2", other_tables, other_meta)
    versions = {}
    for tag in (v1.tag, same.tag, other.tag):
        _, mats, _ = run(FASHION, reg, tag)
        versions[tag] = mats[dataset_key(FASHION)].tags["dagster/data_version"]
    assert versions[v1.tag] == versions[same.tag]
    assert versions[other.tag] != versions[v1.tag]


def test_text_dataset_and_label_map(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = text_version()
    v = pub.publish("tweet-sentiment", "1.0.0", tables, metadata)
    result, mats, checks = run(TWEETS, reg, v.tag)
    assert result.success
    assert set(meta(mats[dataset_key(TWEETS)], "class_balance_train")) == set(LABEL_MAP.values())
    assert meta(mats[preprocessing_key(TWEETS)], "label_map") == LABEL_MAP
    assert checks["schema"].passed and checks["label_map_matches_data"].passed


def _image_table(images, labels):
    n = len(labels)
    flat = np.asarray(images).reshape(n, -1)
    offsets = pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32))
    values = pa.array(flat.reshape(-1).astype(np.int64))
    return pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, values),
                                 pa.array(labels, type=pa.int64())],
                                names=["image", "label"])


def corrupt_versions():
    good = image_split(80, 0)
    val = image_split(20, 1)
    mean, std = sources.pixel_stats(good.images)
    metadata = {"normalization": {"mean": mean, "std": std}, "classes": list(sources.FASHION_MNIST_CLASSES)}
    hot = good.images.astype(np.int64)
    hot[3, 0, 0] = 300
    hot[5, 1, 1] = -4
    bad_labels = good.labels.copy()
    bad_labels[7] = 12
    short = [row.reshape(-1)[:700] for row in good.images]
    short_table = pa.Table.from_arrays(
        [pa.array([r.tolist() for r in short], type=pa.list_(pa.uint8())), pa.array(good.labels)],
        names=["image", "label"])
    val_table = sources.image_table(val)
    wrong_norm = {**metadata, "normalization": {"mean": mean + 0.1, "std": std}}
    return {
        "pixel-range": ({"train": _image_table(hot, good.labels), "val": val_table}, metadata, "schema",
                        "pixel_"),
        "unknown-label": ({"train": _image_table(good.images, bad_labels), "val": val_table}, metadata,
                          "schema", "label"),
        "wrong-shape": ({"train": short_table, "val": val_table}, metadata, "schema", "n_pixels"),
        "wrong-normalization": ({"train": sources.image_table(good), "val": val_table}, wrong_norm,
                                "normalization_matches_data", None),
    }


@pytest.mark.parametrize("case", ["pixel-range", "unknown-label", "wrong-shape", "wrong-normalization"])
def test_corrupt_version_fails_blocking_check_and_stops_downstream(tmp_path, case, ray_local):
    tables, metadata, check, failure = corrupt_versions()[case]
    from ocm_assets.build import family_assets
    from ocm_resources.mlflow import LocalMlflow
    from ocm_resources.ray import RayHead
    from ocm_resources.storage import CheckpointStorage

    pub, reg = new_registry(tmp_path)
    v = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(FASHION.partitions_name, [v.tag])
    # The whole retrain selection (dataset, preprocessing, model) with real resources (Ray: the session's):
    # the model step would train if the blocking check let it run.
    result = dg.materialize(
        family_assets(FASHION), partition_key=v.tag, instance=instance, raise_on_error=False,
        resources={"registry": reg, "ray_cluster": RayHead(), "mlflow": LocalMlflow(home=str(tmp_path)),
                   "checkpoints": CheckpointStorage(base_path=str(tmp_path / "ray-results"))},
    )  # fmt: skip
    mats = {e.asset_key for e in result.get_asset_materialization_events()}
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not result.success
    assert not checks[check].passed
    if failure:
        assert any(failure in k for k in checks[check].metadata["failures"].value), checks[check].metadata
    # blocking: the model step was planned in this run (its ASSET_MATERIALIZATION_PLANNED event) and never
    # started: the engine logged that it did not execute it, no other event of it is in the run's log, it has
    # no step stats, and nothing it makes was materialized
    logs = instance.all_logs(result.run_id)
    stats_of = {s.step_key for s in instance.get_run_step_stats(result.run_id)}

    def events_of(step: str) -> set:
        return {e.dagster_event_type for e in logs if e.step_key == step and e.is_dagster_event}

    def not_executed(step: str) -> bool:
        return any(e.step_key == step and f"Dependencies for step {step} failed" in e.user_message
                   and e.user_message.endswith("Not executing.") for e in logs)

    def planned_only(step: str) -> bool:
        kinds = events_of(step)
        return dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED in kinds and kinds <= {
            dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
            dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED}

    assert planned_only("fashion_mnist__model") and "fashion_mnist__model" not in stats_of
    assert not_executed("fashion_mnist__model")
    assert model_key(FASHION) not in mats
    failed = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    assert "Steps failed: ['fashion_mnist__" in failed.message and "__model" not in failed.message
    if check == "schema":  # the dataset's check: preprocessing never ran either
        assert planned_only("fashion_mnist__preprocessing")
        assert not_executed("fashion_mnist__preprocessing")
        assert preprocessing_key(FASHION) not in mats


def test_missing_file_fails_the_dataset_with_a_clear_error(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = image_version()
    v = pub.publish("fashion-mnist", "1.0.0", {"train": tables["train"]}, metadata)
    result, mats, _ = run(FASHION, reg, v.tag)
    assert not result.success and not mats
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "fashion-mnist/val.parquet is missing" in failure.step_failure_data.error.to_string()


def test_empty_text_and_unknown_label_fail(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = text_version()
    texts = tables["train"].column("text").to_pylist()
    labels = tables["train"].column("label").to_pylist()
    texts[2], labels[4] = "   ", 7
    tables["train"] = pa.Table.from_arrays([pa.array(texts), pa.array(labels, type=pa.int64())],
                                           schema=sources.TEXT_SCHEMA)
    v = pub.publish("tweet-sentiment", "1.0.0", tables, metadata)
    result, mats, checks = run(TWEETS, reg, v.tag)
    assert not result.success and not checks["schema"].passed
    failures = checks["schema"].metadata["failures"].value
    assert any("text" in k for k in failures) and any("label" in k for k in failures)
    assert preprocessing_key(TWEETS) not in mats


def test_label_map_with_a_gap_fails_the_dataset_with_the_contract_rule(tmp_path):
    """Keys {"0", "2"}: the one label-map rule (ocm_ml.contract) refuses them before any row is read."""
    pub, reg = new_registry(tmp_path)
    tables, _ = text_version()
    v = pub.publish("tweet-sentiment", "1.0.0", tables, {"label_map": {"0": "negative", "2": "positive"}})
    result, mats, _ = run(TWEETS, reg, v.tag)
    assert not result.success and not mats
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()
    assert "label_map keys must be the ids 0..1" in failure and "tweet-sentiment/metadata.json" in failure

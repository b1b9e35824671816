"""Serving reads a model's preprocessing at the registry commit its run recorded (``dvc_commit``), not at the
tag: moving or deleting the tag later changes nothing that is loaded or served."""

import pyarrow as pa
import pytest

from tests.registry_helpers import CLASSES, new_registry


@pytest.fixture
def legacy_model(tmp_path):
    """A bare torch model (MLflow's pytorch flavour, no preprocessing inside) trained on v1.0.0 (mean 0.5)."""
    import mlflow
    from torch import nn

    pub, reg = new_registry(tmp_path)
    images = pa.table({"image": pa.array([b"\x00" * 784] * 4), "label": pa.array([0, 1, 2, 3])})
    v1 = pub.publish("fashion-mnist", "1.0.0", {"train": images, "val": images},
                     {"normalization": {"mean": 0.5, "std": 0.25}, "classes": CLASSES})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("pinned", artifact_location=(tmp_path / "artifacts").as_uri())
    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment,
                              tags={"dvc_data_version": v1.tag, "dvc_commit": v1.commit}):
            info = mlflow.pytorch.log_model(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), name="model",
                                            serialization_format="pickle", pip_requirements=["torch"])
        mlflow.register_model(info.model_uri, "pinned.fashion-mnist-classifier")
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])
    config = {"kind": "image", "model_uri": "models:/pinned.fashion-mnist-classifier/1", "tracking_uri": uri,
              "registry_url": str(pub.root), "warmup": False}
    return pub, v1, config


def test_moved_or_deleted_tag_leaves_the_served_preprocessing_unchanged(legacy_model):
    from ocm_ml.serve.loading import ServeConfig, load_bundle

    pub, v1, config = legacy_model
    before = load_bundle(ServeConfig.from_user_config(config))
    assert before.mean == 0.5 and before.describe()["dvc_commit"] == v1.commit

    moved = pub.publish("fashion-mnist", "1.0.0", {}, {"normalization": {"mean": 0.1, "std": 0.9},
                                                       "classes": CLASSES}, force=True)
    assert moved.commit != v1.commit
    after = load_bundle(ServeConfig.from_user_config(config))
    assert (after.mean, after.std, after.metadata_md5) == (0.5, 0.25, before.metadata_md5)

    pub.delete_tag("fashion-mnist-v1.0.0")
    assert load_bundle(ServeConfig.from_user_config(config)).mean == 0.5


def test_a_run_without_its_commit_is_refused_with_a_reason(tmp_path):
    from ocm_ml.serve.loading import LoadError, read_dataset_metadata

    with pytest.raises(LoadError, match="no 'dvc_commit' tag"):
        read_dataset_metadata(str(tmp_path), "fashion-mnist-v1.0.0", None)

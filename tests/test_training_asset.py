"""fashion_mnist/model: 2-worker DDP on Ray Train, in-process, against a temporary registry and MLflow."""

import re

import dagster as dg
import pytest

from ocm_assets.build import family_assets
from ocm_assets.families import family
from ocm_assets.reuse import REUSE_TAG
from ocm_assets.training import model_key
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.ray import RayHead
from ocm_resources.storage import CheckpointStorage
from tests.registry_helpers import image_split, image_version, new_registry

FASHION = family("fashion_mnist")
QUICK = {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 32, "epochs": 2, "learning_rate": 2e-3}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("train")
    pub, reg = new_registry(root)
    tables, metadata = image_version(n_train=320, n_val=80)
    v1 = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    resources = {
        "registry": reg,
        "ray_cluster": RayHead(keep_alive=True),
        "mlflow": LocalMlflow(home=str(root), env_name="test"),
        "checkpoints": CheckpointStorage(base_path=str(root / "ray-results")),
    }
    return pub, reg, v1, resources


def materialize(resources, tag, config, instance=None, tags=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(FASHION.partitions_name, [tag])
    return dg.materialize(
        family_assets(FASHION), partition_key=tag, resources=resources, instance=instance,
        run_config={"ops": {"fashion_mnist__model": {"config": config}}}, raise_on_error=False, tags=tags,
    )


def test_ddp_materialization_logs_registers_and_predicts(stack):
    import mlflow

    pub, reg, v1, resources = stack
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(resources, v1.tag, QUICK, instance)
    assert result.success
    mat = next(e.materialization for e in result.get_asset_materialization_events()
               if e.asset_key == model_key(FASHION))
    md = {k: v.value for k, v in mat.metadata.items()}
    assert md["workers"] == 2 and md["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert md["registered_model"] == "test.fashion-mnist-classifier" and md["registered_version"] == 1
    assert md["images_per_second"] > 0 and md["checkpoint_path"]
    assert "data:image/png;base64," in md["training_curve"]
    assert len(md["history"]) == 2

    # per-epoch progress reached the Dagster run log while training ran
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    epoch_lines = [m for m in logs if re.match(r"epoch \d+: .*val_accuracy=", m)]
    assert len(epoch_lines) == 2, logs

    client = resources["mlflow"].configure()
    run = client.get_run(md["mlflow_run_id"])
    for key in ("dvc_data_version", "dvc_commit", "dagster_run_id", "dagster_partition", "docker_image_tag",
                "code_version"):
        assert run.data.tags[key], key
    assert run.data.tags["dvc_data_version"] == v1.tag and run.data.tags["dvc_commit"] == v1.commit
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.params["num_workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(history) >= 2
    assert "training_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    version = client.get_model_version("test.fashion-mnist-classifier", "1")
    assert version.tags["data_version"] == v1.tag

    # the registered model carries its preprocessing: raw 0-255 pixels in, through plain MLflow
    loaded = mlflow.pyfunc.load_model("models:/test.fashion-mnist-classifier/1")
    import pandas as pd

    images = image_split(5, 42).images
    out = loaded.predict(pd.DataFrame({"image": [img.tolist() for img in images]}))  # 28x28 nested lists
    assert list(out.columns) == ["class_id", "class_name", "confidence"] and len(out) == 5
    assert set(out["class_name"]) <= set(reg.read_metadata(v1).classes)
    flat = loaded.predict(pd.DataFrame({"image": [img.reshape(-1).tolist() for img in images]}))
    assert flat["class_id"].tolist() == out["class_id"].tolist()
    assert version.tags["val_accuracy"] == f"{md['val_accuracy']:.6f}"
    # the run's latest val_accuracy (highest step) is the registered (best) checkpoint's
    assert run.data.metrics["val_accuracy"] == pytest.approx(md["val_accuracy"])


def test_run_config_is_generated_from_the_core_settings():
    from dataclasses import fields

    from ocm_assets.training import VisionTrainConfig
    from ocm_ml.vision.settings import TrainSettings

    assert list(VisionTrainConfig.model_fields) == [f.name for f in fields(TrainSettings)]
    for f in fields(TrainSettings):
        config_field = VisionTrainConfig.model_fields[f.name]
        assert (config_field.default, config_field.description) == (f.default,
                                                                    f.metadata["description"]), f.name
    assert VisionTrainConfig(epochs=3, row_limit=9).settings() == TrainSettings(epochs=3, row_limit=9)


@pytest.mark.parametrize("config, message", [
    ({"num_workers": 0}, "num_workers"),
    ({"num_workers": 2, "cpus_per_worker": 4}, "CPU"),
])
def test_bad_configuration_fails_fast(stack, config, message):
    _, _, v1, resources = stack
    result = materialize(resources, v1.tag, config)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    text = failure.step_failure_data.error.to_string()
    assert message in text and "ValueError" in text


def test_unknown_partition_is_refused(stack):
    _, _, _, resources = stack
    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(dg.DagsterUnknownPartitionError, match="partition with key `fashion-mnist-v7.0.0`"):
        dg.materialize(family_assets(FASHION), partition_key="fashion-mnist-v7.0.0", resources=resources,
                       instance=instance)


def test_same_partition_and_seed_reproduce_validation_accuracy(stack):
    """Re-materializing one partition with one seed gives the same validation accuracy (±0.5 points) on CPU.

    Both runs are tagged ``ocm/reuse=off``: from a clean checkout the second would otherwise reuse the first's
    model by its training key (ocm_assets/reuse.py), and a reused model reproduces nothing."""
    _, _, v1, resources = stack
    config = {**QUICK, "epochs": 1, "seed": 7}
    runs = []
    for _ in range(2):
        result = materialize(resources, v1.tag, config, tags={REUSE_TAG: "off"})
        assert result.success
        mat = next(e.materialization for e in result.get_asset_materialization_events()
                   if e.asset_key == model_key(FASHION))
        runs.append({k: v.value for k, v in mat.metadata.items()})
    first, second = runs
    assert first["mlflow_run_id"] != second["mlflow_run_id"]  # two real runs, not a cached answer
    assert first["checkpoint_path"] != second["checkpoint_path"]
    assert abs(first["val_accuracy"] - second["val_accuracy"]) <= 0.005, (first["val_accuracy"],
                                                                          second["val_accuracy"])
    assert abs(first["val_loss"] - second["val_loss"]) <= 0.01, (first["val_loss"], second["val_loss"])


def test_training_refuses_data_whose_blocking_check_failed(stack, tmp_path):
    """A failed blocking check stops the model step in the same run (no STEP_START), and a later hand-made
    materialization of the model alone is refused too: nothing trains on data that failed validation."""
    pub, _, _, resources = stack
    tables, metadata = image_version(n_train=64, n_val=16, seed=5)
    bad = pub.publish("fashion-mnist", "1.5.0", tables,
                      {**metadata, "normalization": {"mean": 0.9, "std": 0.1}})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(FASHION.partitions_name, [bad.tag])
    shared = {**resources, "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}
    run_config = {"ops": {"fashion_mnist__model": {"config": QUICK}}}
    first = dg.materialize(family_assets(FASHION), partition_key=bad.tag, resources=shared, instance=instance,
                           run_config=run_config, raise_on_error=False)
    assert not first.success
    assert {e.check_name: e.passed for e in first.get_asset_check_evaluations()} == {
        "schema": True, "normalization_matches_data": False}
    assert not [e for e in first.all_events if e.is_step_start and e.step_key == "fashion_mnist__model"]

    by_hand = dg.materialize(family_assets(FASHION), partition_key=bad.tag, resources=shared,
                             instance=instance, run_config=run_config, raise_on_error=False,
                             selection=[model_key(FASHION)])
    assert not by_hand.success
    failure = next(e for e in by_hand.all_events if e.is_step_failure).step_failure_data.error.to_string()
    assert "normalization_matches_data" in failure and "refusing to train" in failure
    assert resources["mlflow"].version_of_partition("fashion-mnist", bad.tag) is None  # nothing registered

"""No retraining of data already seen: a new tag on identical content (same DVC md5s and metadata.json), with
the same code version and training config, reuses the registered model; a config or code change trains again.
The count of trainings is the number of MLflow training runs the real model step created."""

import dagster as dg
import pytest

from ocm_assets.build import family_assets
from ocm_assets.evaluation import build_evaluation_asset, evaluation_key
from ocm_assets.families import family
from ocm_assets.reuse import KEY_TAG, partition_tag, training_key
from ocm_assets.training import model_key
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.ray import RayHead
from ocm_resources.storage import CheckpointStorage
from tests.registry_helpers import image_version, new_registry, publish_holdout

FASHION = family("fashion_mnist")
QUICK = {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 64, "epochs": 1, "learning_rate": 2e-3,
         "row_limit": 128}
DATASET = {"files": {"train": {"md5": "a" * 32}, "val": {"md5": "b" * 32}}}
PREPROCESSING = {"mean": 0.28, "std": 0.35, "classes": ["a", "b"], "tag": "fashion-mnist-v1.0.0",
                 "commit": "c1", "data_version": "x"}


@pytest.mark.parametrize(("change", "same"), [
    ({}, True),
    ({"preprocessing": {**PREPROCESSING, "tag": "fashion-mnist-v9.0.0", "commit": "c9"}}, True),  # a re-tag
    ({"dataset": {"files": {"train": {"md5": "c" * 32}, "val": {"md5": "b" * 32}}}}, False),
    ({"preprocessing": {**PREPROCESSING, "std": 0.36}}, False),
    ({"preprocessing": {**PREPROCESSING, "classes": ["a", "B"]}}, False),
    ({"config": {**QUICK, "learning_rate": 1e-3}}, False),
    ({"code_version": "def456"}, False),
])
def test_the_training_key_is_content_code_and_config(change, same):
    base = {"dataset": DATASET, "preprocessing": PREPROCESSING, "config": QUICK, "code_version": "abc123"}
    args = {**base, **change}
    assert (training_key(FASHION, **args) == training_key(FASHION, **base)) is same


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("reuse")
    pub, reg = new_registry(root)
    publish_holdout(pub)
    tables, metadata = image_version(n_train=160, n_val=40)
    v1 = pub.publish("fashion-mnist", "1.0.0", tables, metadata)
    common = {
        "registry": reg,
        "ray_cluster": RayHead(keep_alive=True),
        "checkpoints": CheckpointStorage(base_path=str(root / "ray-results")),
    }
    # a committed code version (a "-dirty" checkout never reuses)
    mlflow = LocalMlflow(home=str(root), env_name="reuse", code_version="0123abcd")
    with dg.instance_for_test() as instance:
        yield pub, v1, (tables, metadata), {**common, "mlflow": mlflow}, common, root, instance


def materialize(resources, instance, tag, config):
    if not instance.has_dynamic_partition(FASHION.partitions_name, tag):
        instance.add_dynamic_partitions(FASHION.partitions_name, [tag])
    result = dg.materialize(family_assets(FASHION), partition_key=tag, resources=resources, instance=instance,
                            run_config={"ops": {"fashion_mnist__model": {"config": config}}},
                            raise_on_error=False)
    assert result.success
    mat = next(e.materialization for e in result.get_asset_materialization_events()
               if e.asset_key == model_key(FASHION))
    return result, {k: v.value for k, v in mat.metadata.items()}


def training_runs(mlflow) -> int:
    """MLflow runs the model step opened to train (evaluation runs are tagged ocm_stage=evaluation)."""
    client = mlflow.configure()
    experiment = client.get_experiment_by_name(f"{mlflow.env_name}.{FASHION.dataset}")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="attributes.run_name LIKE '% train %'")
    return len(runs)


def test_identical_content_under_a_new_tag_reuses_the_model_and_a_change_trains_again(stack):
    pub, v1, (tables, metadata), resources, common, root, instance = stack
    mlflow = resources["mlflow"]
    _, first = materialize(resources, instance, v1.tag, QUICK)
    assert first["reused"] is False and first["registered_version"] == 1
    assert training_runs(mlflow) == 1
    assert mlflow.version(FASHION.dataset, 1).tags[KEY_TAG] == first["training_key"]

    # the same tables and metadata.json published again: a new tag on the same commit and DVC md5s
    v2 = pub.publish("fashion-mnist", "1.0.1", tables, metadata)
    assert v2.commit == v1.commit
    result, second = materialize(resources, instance, v2.tag, QUICK)
    assert training_runs(mlflow) == 1  # the trainer was not called
    assert second["reused"] is True and second["registered_version"] == 1
    assert second["reused_from_partition"] == v1.tag and second["training_key"] == first["training_key"]
    assert mlflow.version(FASHION.dataset, 1).tags[partition_tag(v2.tag)] == result.run_id
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("reusing" in m and "nothing is trained" in m for m in logs), logs

    # the new partition's evaluation finds its challenger: the reused version
    evaluated = dg.materialize([*family_assets(FASHION), build_evaluation_asset(FASHION)],
                               selection=[evaluation_key(FASHION)], partition_key=v2.tag, resources=resources,
                               instance=instance)
    mat = next(e.materialization for e in evaluated.get_asset_materialization_events())
    assert mat.metadata["challenger_version"].value == 1

    # a config change trains again
    _, changed = materialize(resources, instance, v2.tag, {**QUICK, "learning_rate": 1e-3})
    assert changed["reused"] is False and changed["registered_version"] == 2
    assert training_runs(mlflow) == 2

    # and so does a code change (another committed code version), for the same data and config
    other_code = {**common, "mlflow": LocalMlflow(home=str(root), env_name="reuse", code_version="4567cdef")}
    _, recoded = materialize(other_code, instance, v2.tag, QUICK)
    assert recoded["reused"] is False and recoded["registered_version"] == 3
    assert training_runs(mlflow) == 3


TINY_SEARCH = {"num_trials": 1, "max_epochs": 1, "row_limit": None, "val_row_limit": None, "max_length": 16,
               "freeze_layers": 0, "max_concurrent_trials": 1, "grace_period": 1}


def test_identical_texts_under_a_new_tag_are_not_searched_again(tmp_path, ray_local):
    from ocm_assets.text import hpo_key
    from ocm_ml.text.backbone import make_tiny_backbone
    from tests.registry_helpers import text_version

    tweets = family("tweet_sentiment")
    pub, reg = new_registry(tmp_path)
    publish_holdout(pub, "tweet-sentiment", n=30)
    tables, metadata = text_version(n_train=60, n_val=20)
    v1 = pub.publish("tweet-sentiment", "1.0.0", tables, metadata)
    backbone = make_tiny_backbone(tmp_path / "tiny_bert", tables["train"].column("text").to_pylist(), seed=0)
    mlflow = LocalMlflow(home=str(tmp_path), env_name="reuse", code_version="0123abcd")
    resources = {"registry": reg, "ray_cluster": RayHead(keep_alive=True), "mlflow": mlflow,
                 "checkpoints": CheckpointStorage(base_path=str(tmp_path / "ray-results"))}
    config = {"ops": {"tweet_sentiment__hpo": {"config": {**TINY_SEARCH, "backbone": str(backbone)}}}}

    def searches() -> int:
        client = mlflow.configure()
        experiment = client.get_experiment_by_name(f"reuse.{tweets.dataset}")
        return len(client.search_runs([experiment.experiment_id], filter_string="tags.ocm_stage = 'hpo'"))

    def run(tag):
        if not instance.has_dynamic_partition(tweets.partitions_name, tag):
            instance.add_dynamic_partitions(tweets.partitions_name, [tag])
        result = dg.materialize(family_assets(tweets), partition_key=tag, resources=resources,
                                instance=instance, run_config=config)
        return {e.asset_key: {k: v.value for k, v in e.materialization.metadata.items()}
                for e in result.get_asset_materialization_events()}

    with dg.instance_for_test() as instance:
        first = run(v1.tag)
        assert first[model_key(tweets)]["registered_version"] == 1 and searches() == 1
        v2 = pub.publish("tweet-sentiment", "1.0.1", tables, metadata)
        second = run(v2.tag)
        assert searches() == 1  # Ray Tune was not started again
        for key in (hpo_key(tweets), model_key(tweets)):
            assert second[key]["reused"] is True and second[key]["registered_version"] == 1
        assert partition_tag(v2.tag) in mlflow.version(tweets.dataset, 1).tags

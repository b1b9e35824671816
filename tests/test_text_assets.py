"""tweet_sentiment/hpo and /model in-process: a 4-trial ASHA search on tiny data with a tiny local backbone,
nested MLflow runs, the best model registered and predicting labels from the label map."""

import json

import dagster as dg
import pandas as pd
import pytest

from ocm_assets.build import family_assets
from ocm_assets.families import family
from ocm_assets.text import hpo_key
from ocm_assets.training import model_key
from ocm_resources.mlflow import LocalMlflow
from ocm_resources.ray import RayHead
from ocm_resources.storage import CheckpointStorage
from tests.registry_helpers import LABEL_MAP, new_registry, publish_holdout, text_version

TWEETS = family("tweet_sentiment")
SEARCH = {  # the default method: heads on cached embeddings of the (tiny) backbone
    "num_trials": 4, "max_epochs": 4, "row_limit": None, "val_row_limit": None, "metric": "val_loss",
    "mode": "min", "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1, "max_length": 16,
    "embed_actors": 1,
    "search_space": json.dumps({
        "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
        "batch_size": {"type": "choice", "values": [16, 32]},
        "hidden": {"type": "choice", "values": [0, 64]},
    }),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_local):
    from ocm_ml.text.backbone import make_tiny_backbone

    root = tmp_path_factory.mktemp("text")
    pub, reg = new_registry(root)
    publish_holdout(pub, "tweet-sentiment", n=45)
    tables, metadata = text_version(n_train=240, n_val=60)
    v1 = pub.publish("tweet-sentiment", "1.0.0", tables, metadata)
    backbone = make_tiny_backbone(root / "tiny_bert", tables["train"].column("text").to_pylist(), seed=0)
    resources = {
        "registry": reg,
        "ray_cluster": RayHead(keep_alive=True),
        "mlflow": LocalMlflow(home=str(root), env_name="test"),
        "checkpoints": CheckpointStorage(base_path=str(root / "ray-results")),
    }
    return v1, backbone, resources


def materialize(resources, tag, search, assets=None):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TWEETS.partitions_name, [tag])
    return dg.materialize(
        assets or family_assets(TWEETS), partition_key=tag, resources=resources, instance=instance,
        run_config={"ops": {"tweet_sentiment__hpo": {"config": search}}}, raise_on_error=False,
    )


def test_search_nested_runs_and_registered_model(stack):
    import mlflow

    v1, backbone, resources = stack
    result = materialize(resources, v1.tag, {**SEARCH, "backbone": backbone})
    assert result.success
    mats = {e.asset_key: e.materialization for e in result.get_asset_materialization_events()}
    hpo = {k: v.value for k, v in mats[hpo_key(TWEETS)].metadata.items()}
    assert hpo["trials_stopped_early"] >= 1
    assert hpo["trial_epochs_run"] < hpo["trial_epochs_without_early_stopping"] == 16
    assert hpo["trials"].count("\n") == 5 and "(best)" in hpo["trials"]
    model = {k: v.value for k, v in mats[model_key(TWEETS)].metadata.items()}
    assert model["registered_model"] == "test.tweet-sentiment-classifier"
    # three balanced classes (majority 1/3) whose class words make them learnable: above it by a margin
    assert model["val_accuracy"] >= model["majority_baseline_accuracy"] + 0.2 and model["eval_rows"] == 60
    assert hpo["method"] == "embeddings" and hpo["embedding"]["cache_misses"] == 2

    client = resources["mlflow"].configure()
    parent = client.get_run(hpo["mlflow_parent_run_id"])
    assert (parent.data.tags["dvc_data_version"] == v1.tag
            and parent.data.tags["dagster_run_id"] == result.run_id)
    assert (parent.data.params["scheduler"] == "ASHA"
            and parent.data.tags["best_trial_id"] == hpo["best_trial"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    statuses = {c.data.tags["trial_id"]: c.info.status for c in children}
    assert "KILLED" in statuses.values() and "FINISHED" in statuses.values()
    for child in children:
        assert child.data.tags["stopped_early"] == ("true" if child.info.status == "KILLED" else "false")
        assert "learning_rate" in child.data.params and child.data.tags["dvc_commit"] == v1.commit
        assert client.get_metric_history(child.info.run_id, "val_loss")

    loaded = mlflow.pyfunc.load_model(model["model_uri"])
    out = loaded.predict(pd.DataFrame({"text": ["love great happy best", "awful hate terrible worst"]}))
    labels = out["label"].tolist() if hasattr(out, "columns") else [o["label"] for o in out]
    assert set(labels) <= set(LABEL_MAP.values())

    # the evaluation finds this partition's model (no champion yet) and scores it on the holdout, per class
    from ocm_assets.evaluation import build_evaluation_asset, evaluation_key

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TWEETS.partitions_name, [v1.tag])
    evaluated = dg.materialize(
        [dg.SourceAsset(model_key(TWEETS),
                        partitions_def=dg.DynamicPartitionsDefinition(name=TWEETS.partitions_name)),
         build_evaluation_asset(TWEETS)],
        partition_key=v1.tag, resources=resources, instance=instance, selection=[evaluation_key(TWEETS)])
    record = next(e.materialization
                  for e in evaluated.get_asset_materialization_events()).metadata["evaluation"].value
    assert record["challenger_version"] == model["registered_version"] and record["champion_version"] is None
    holdout = record["scores"]["challenger"]["holdout"]
    assert holdout["rows"] == 45 and len(holdout["per_class_accuracy"]) == 3
    assert sum(map(sum, holdout["confusion"])) == 45
    assert 0.3 <= record["baselines"]["majority"]["holdout"]["accuracy"] < 0.6  # 3 balanced classes
    # the TF-IDF + LR reference, fitted on this version's training split, scored on the same rows
    reference = record["baselines"]["tfidf_lr"]
    assert set(reference) == {"holdout", "val"} and 0.0 <= reference["holdout"]["macro_f1"] <= 1.0
    assert reference["holdout"]["accuracy"] > record["baselines"]["majority"]["holdout"]["accuracy"]


@pytest.mark.parametrize("change, message", [
    ({"search_space": json.dumps({"learning_rate": {"type": "loguniform", "low": 0, "high": 1}})},
     "learning_rate"),
    ({"search_space": "{not json"}, "not valid JSON"),
    ({"backbone": "/nonexistent/backbone-dir"}, "/nonexistent/backbone-dir"),
])
def test_bad_search_fails_fast(stack, change, message):
    v1, backbone, resources = stack
    result = materialize(resources, v1.tag, {**SEARCH, "backbone": backbone, **change})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "tweet_sentiment__hpo"
    assert message in failure.step_failure_data.error.to_string()


def test_zero_eval_rows_is_refused_with_a_reason(stack):
    v1, backbone, resources = stack
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TWEETS.partitions_name, [v1.tag])
    search = {**SEARCH, "backbone": backbone, "num_trials": 1, "max_epochs": 1}
    result = dg.materialize(
        family_assets(TWEETS), partition_key=v1.tag, resources=resources, instance=instance,
        raise_on_error=False,
        run_config={"ops": {"tweet_sentiment__hpo": {"config": search},
                            "tweet_sentiment__model": {"config": {"eval_rows": 0}}}})
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "tweet_sentiment__model"
    assert "eval_rows must be >= 1" in failure.step_failure_data.error.to_string()

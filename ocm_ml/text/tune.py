"""Hyperparameter search for the text classifier on Ray Tune with ASHA early stopping.

Two methods (``SearchSettings.method``): ``embeddings`` (default) embeds every text once with the frozen
backbone (``ocm_ml.text.embeddings``, cached) and each trial fits a head on those features; ``finetune``:
each trial is a Tune *function trainable* that fine-tunes in-process with a Lightning ``Trainer`` on the
trial's own CPUs, reporting ``val_loss``, ``val_accuracy``, ``val_macro_f1`` and ``epoch`` once per epoch with
a checkpoint (model + tokenizer + labels.json). A function trainable, not a ``TorchTrainer`` per trial: on
CPU a trial is one process, so Ray Train's worker group, DDP and extra actors add start-up time and memory
(Train V2 would launch a controller plus a worker per trial) and buy nothing; ASHA stops the trial itself.

>>> result = run_search("data/train.parquet", "data/val.parquet", {"0": "negative", "1": "neutral",
...                     "2": "positive"}, None, SearchSettings(), "/tmp/ray_results", "hpo",
...                     cache_dir="/tmp/embedding-cache")
>>> result.best_config, result.best_metrics["val_accuracy"], result.best_checkpoint_dir

The search space is plain data (JSON/YAML friendly), converted by ``build_search_space``::

    {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
     "batch_size": {"type": "choice", "values": [16, 32]},
     "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1}}

A bare number is a fixed value (``"batch_size": 16``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

METHODS = ("embeddings", "finetune")
#: What each method searches; ``choice`` values of ``class_weighting`` are names, every other value a number.
HYPERPARAMETERS = {
    "embeddings": ("learning_rate", "batch_size", "weight_decay", "hidden", "dropout", "class_weighting"),
    "finetune": ("learning_rate", "batch_size", "weight_decay"),
}
CLASS_WEIGHTINGS = ("none", "balanced")
SPACE_TYPES = ("loguniform", "uniform", "choice")
METRIC_MODES = {"val_accuracy": "max", "val_macro_f1": "max", "val_loss": "min"}


def default_search_space(method: str = "embeddings") -> dict[str, Any]:
    """The one definition of each method's default space (the Dagster config's default comes from here)."""
    if method == "finetune":
        return {
            "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
            "batch_size": {"type": "choice", "values": [16, 32]},
            "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        }
    return {
        "learning_rate": {"type": "loguniform", "low": 3e-4, "high": 1e-2},
        "batch_size": {"type": "choice", "values": [64, 256]},
        "weight_decay": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
        "hidden": {"type": "choice", "values": [0, 256, 768]},
        "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
        "class_weighting": {"type": "choice", "values": ["none", "balanced"]},
    }


def _described(default: Any, description: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"description": description}, **kwargs)


@dataclass(frozen=True)
class SearchSettings:
    """What one text search does: the single source of the fields, their defaults, descriptions and checks
    (``validate_settings``, run once when the object is made). The Dagster config ``TextSearchConfig`` is
    generated from these fields.

    The defaults fit the demo on 2 CPUs: every training tweet embedded once by the frozen backbone (cached),
    then 12 ASHA trials of a head for up to 12 epochs each. ``method="finetune"`` trains the transformer
    itself (a GPU's job: 27-65 samples/s on 2 CPUs)."""

    method: str = _described("embeddings", "embeddings: a head on cached frozen-backbone sentence embeddings "
                             "(all the data, cheap trials); finetune: train the transformer (GPU users).")
    num_trials: int = _described(12, "Trials (samples of the search space).")
    max_epochs: int = _described(12, "Epochs a trial may run (ASHA max_t).")
    row_limit: int | None = _described(None, "Training rows sampled (seeded) from the train split; None: all")
    val_row_limit: int | None = _described(
        2000, "Validation rows the trials are scored on, every k-th row of the split; None: all.")
    metric: str = _described("val_macro_f1", "val_accuracy, val_macro_f1 or val_loss.")
    mode: str = _described("max", "max or min for the metric.")
    scheduler: str = _described("asha", "asha: ASHA stops weak trials early; fifo: all run max_epochs.")
    grace_period: int = _described(2, "ASHA: epochs before a trial may be stopped.")
    reduction_factor: int = _described(3, "ASHA: keep 1/reduction_factor of the trials at each rung.")
    max_concurrent_trials: int | None = _described(None, "None: as many as the cluster's CPUs fit.")
    cpus_per_trial: int = _described(1, "CPUs per trial.")
    seed: int = _described(0, "Seed for sampling rows and the search.")
    max_length: int = _described(64, "Tokens per text.")
    freeze_layers: int = _described(4, "finetune: embeddings + the lowest N encoder layers stay frozen.")
    embed_actors: int = _described(2, "embeddings: Ray Data actors (1 CPU each) that embed the texts.")
    embed_batch_size: int = _described(128, "embeddings: texts per embedding batch.")
    pool_layers: int = _described(
        2, "embeddings: the top N encoder layers, each mean-pooled, concatenated as the features (1: the "
        "last layer, the sentence-transformers embedding; 2 scored higher on the tweets: "
        "docs/text_model.md).")
    search_space: dict[str, Any] | None = _described(
        None, "Plain-data space: {name: number | {type: loguniform|uniform, low, high} | "
        "{type: choice, values}}; None: the method's default (default_search_space).")

    def __post_init__(self) -> None:
        validate_settings(self)  # the one check: a SearchSettings that exists is valid

    def space(self) -> dict[str, Any]:
        return self.search_space if self.search_space is not None else default_search_space(self.method)


@dataclass
class TrialSummary:
    trial_id: str
    config: dict[str, Any]
    # one dict per epoch: epoch, val_loss, val_accuracy, val_macro_f1, train_loss
    history: list[dict[str, Any]]
    best_metric: float | None  # best value of settings.metric over the epochs (None: nothing reported)
    epochs_run: int
    stopped_early: bool  # ASHA stopped it: fewer than max_epochs and no error
    status: str  # "TERMINATED" or "ERROR"
    error: str | None = None


@dataclass
class SearchResult:
    trials: list[TrialSummary]
    best_trial_id: str
    best_config: dict[str, Any]
    best_metrics: dict[str, float]  # at the best epoch: val_accuracy, val_macro_f1, val_loss, epoch
    best_checkpoint_dir: str  # local folder: save_pretrained model + tokenizer + labels.json
    trial_epochs_run: int
    trial_epochs_budget: int  # num_trials * max_epochs
    num_stopped_early: int
    experiment_path: str
    wall_time_s: float
    embedding: dict[str, Any] = field(default_factory=dict)  # cache hits/misses and seconds (embeddings)



# --- validation -----------------------------------------------------------------------------------------


def _is_number(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_values(name: str, values: Sequence[Any]) -> None:
    for v in values:
        if name == "class_weighting":
            if v not in CLASS_WEIGHTINGS:
                raise ValueError(
                    f"search space 'class_weighting': {v!r} is not one of {list(CLASS_WEIGHTINGS)}")
            continue
        if not _is_number(v):
            raise ValueError(f"search space {name!r}: {v!r} is not a finite number")
        least = 1 if name == "batch_size" else 0
        if name in ("batch_size", "hidden") and (not float(v).is_integer() or v < least):
            what = "positive" if least else "non-negative"
            raise ValueError(f"search space {name!r}: {v!r} is not a {what} integer")
        if name == "learning_rate" and v <= 0:
            raise ValueError(f"search space 'learning_rate': {v!r} must be > 0")
        if name == "weight_decay" and v < 0:
            raise ValueError(f"search space 'weight_decay': {v!r} must be >= 0")
        if name == "dropout" and not 0 <= v < 1:
            raise ValueError(f"search space 'dropout': {v!r} must be in [0, 1)")


def validate_search_space(spec: Mapping[str, Any], method: str = "finetune") -> None:
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"search space must be a non-empty mapping of hyperparameter -> spec, got {spec!r}")
    known = HYPERPARAMETERS[method]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(
            f"search space: unknown hyperparameter(s) {unknown} for method {method!r}; known: {list(known)}")
    for name, entry in spec.items():
        if _is_number(entry) or (name == "class_weighting" and isinstance(entry, str)):
            _check_values(name, [entry])
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"search space {name!r}: expected a number or a mapping with 'type', got {entry!r}"
            )
        kind = entry.get("type")
        if kind not in SPACE_TYPES:
            raise ValueError(
                f"search space {name!r}: unknown type {kind!r}; expected one of {list(SPACE_TYPES)}"
            )
        if kind == "choice":
            values = entry.get("values")
            if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
                raise ValueError(f"search space {name!r}: 'choice' needs a non-empty list 'values'")
            _check_values(name, values)
            continue
        low, high = entry.get("low"), entry.get("high")
        if not (_is_number(low) and _is_number(high)):
            raise ValueError(
                f"search space {name!r}: {kind!r} needs numeric 'low' and 'high', got {low!r}, {high!r}"
            )
        if low >= high:
            raise ValueError(f"search space {name!r}: low ({low}) must be < high ({high})")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"search space {name!r}: loguniform needs low > 0, got {low}")
        if name in ("batch_size", "hidden", "class_weighting"):
            raise ValueError(f"search space {name!r}: use a 'choice' of values, not a continuous range")
        _check_values(name, [low, high])


def _cast(name: str, value: Any) -> Any:
    if name == "class_weighting":
        return str(value)
    return int(value) if name in ("batch_size", "hidden") else float(value)


def build_search_space(spec: Mapping[str, Any], method: str = "finetune") -> dict[str, Any]:
    """Plain-data search space -> ``ray.tune`` domains (``ValueError`` if invalid)."""
    from ray import tune

    validate_search_space(spec, method)
    space: dict[str, Any] = {}
    for name, entry in spec.items():
        if not isinstance(entry, Mapping):
            space[name] = _cast(name, entry)
        elif entry["type"] == "loguniform":
            space[name] = tune.loguniform(float(entry["low"]), float(entry["high"]))
        elif entry["type"] == "uniform":
            space[name] = tune.uniform(float(entry["low"]), float(entry["high"]))
        else:
            space[name] = tune.choice([_cast(name, v) for v in entry["values"]])
    return space


def validate_settings(settings: SearchSettings) -> None:
    """Raise ``ValueError`` naming the first bad field; nothing is started."""

    def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"SearchSettings.{name} must be a positive integer, got {value!r}")

    positive_int("num_trials", settings.num_trials)
    positive_int("max_epochs", settings.max_epochs)
    positive_int("row_limit", settings.row_limit, allow_none=True)
    positive_int("val_row_limit", settings.val_row_limit, allow_none=True)
    positive_int("grace_period", settings.grace_period)
    positive_int("max_concurrent_trials", settings.max_concurrent_trials, allow_none=True)
    positive_int("cpus_per_trial", settings.cpus_per_trial)
    if settings.metric not in METRIC_MODES:
        raise ValueError(
            f"SearchSettings.metric must be one of {list(METRIC_MODES)}, got {settings.metric!r}"
        )
    if settings.mode != METRIC_MODES[settings.metric]:
        raise ValueError(
            f"SearchSettings.mode for {settings.metric!r} must be {METRIC_MODES[settings.metric]!r}, "
            f"got {settings.mode!r}"
        )
    if settings.grace_period > settings.max_epochs:
        raise ValueError(
            f"SearchSettings.grace_period ({settings.grace_period}) must be <= max_epochs "
            f"({settings.max_epochs})"
        )
    if not _is_number(settings.reduction_factor) or settings.reduction_factor <= 1:
        raise ValueError(f"SearchSettings.reduction_factor must be > 1, got {settings.reduction_factor!r}")
    if not isinstance(settings.max_length, int) or not 8 <= settings.max_length <= 512:
        raise ValueError(
            f"SearchSettings.max_length must be an integer in 8..512, got {settings.max_length!r}"
        )
    if not isinstance(settings.freeze_layers, int) or settings.freeze_layers < 0:
        raise ValueError(
            f"SearchSettings.freeze_layers must be an integer >= 0, got {settings.freeze_layers!r}"
        )
    if not isinstance(settings.seed, int):
        raise ValueError(f"SearchSettings.seed must be an integer, got {settings.seed!r}")
    if settings.scheduler not in ("asha", "fifo"):
        raise ValueError(f"SearchSettings.scheduler must be 'asha' or 'fifo', got {settings.scheduler!r}")
    if settings.method not in METHODS:
        raise ValueError(f"SearchSettings.method must be one of {list(METHODS)}, got {settings.method!r}")
    positive_int("embed_actors", settings.embed_actors)
    positive_int("pool_layers", settings.pool_layers)
    positive_int("embed_batch_size", settings.embed_batch_size)
    validate_search_space(settings.space(), settings.method)


# --- data and baselines ---------------------------------------------------------------------------------


def load_split(
    url: str, label_map: Mapping[str, str], row_limit: int | None = None, seed: int = 0
) -> tuple[list[str], list[int]]:
    """Texts and label ids from a parquet with columns ``text`` and ``label``; a seeded sample if limited."""
    import pandas as pd

    df = pd.read_parquet(url, columns=["text", "label"])
    if df.empty:
        raise ValueError(f"{url}: no rows")
    if bool(df["text"].isna().any() or df["label"].isna().any()):
        raise ValueError(f"{url}: null text or label")
    known = {int(k) for k in label_map}
    bad = sorted(set(df["label"].astype(int)) - known)
    if bad:
        raise ValueError(f"{url}: label ids {bad[:10]} are not in the label map {sorted(known)}")
    if row_limit is not None and len(df) > row_limit:
        df = df.sample(n=row_limit, random_state=seed)
    return df["text"].astype(str).tolist(), df["label"].astype(int).tolist()


def majority_baseline(labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro F1 of always predicting the most frequent label of ``labels``."""
    import numpy as np

    from ocm_ml.text.module import accuracy, macro_f1

    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        raise ValueError("majority_baseline needs at least one label")
    values, counts = np.unique(y, return_counts=True)
    majority = int(values[counts.argmax()])
    pred = np.full_like(y, majority)
    return {"label": majority, "accuracy": accuracy(y, pred), "macro_f1": macro_f1(y, pred)}


def evaluate(model_dir: str | Path, texts: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro F1 of the model folder on ``texts``."""
    from ocm_ml.text.module import accuracy, macro_f1
    from ocm_ml.text.predictor import TextPredictor

    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    pred = TextPredictor.from_dir(model_dir).predict_ids(texts)
    return {"accuracy": accuracy(labels, pred), "macro_f1": macro_f1(labels, pred)}


# --- the trial ------------------------------------------------------------------------------------------


def _make_report_callback(tokenizer, label_map: Mapping[str, str]):
    import lightning
    from ray import tune

    from ocm_ml.text.module import save_model_dir

    class TuneReportCallback(lightning.Callback):
        """After each epoch's validation: report the metrics to Tune with a model-folder checkpoint."""

        def on_train_epoch_end(self, trainer, pl_module):
            logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
            metrics = {
                k: logged[k]
                for k in ("val_loss", "val_accuracy", "val_macro_f1", "train_loss")
                if k in logged
            }
            metrics["epoch"] = trainer.current_epoch + 1
            with tempfile.TemporaryDirectory(prefix="ocm-text-ckpt-") as tmp:
                save_model_dir(pl_module.model, tokenizer, label_map, tmp)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    return TuneReportCallback()


def train_trial(
    config: Mapping[str, Any],
    *,
    train: tuple[list[str], list[int]],
    val: tuple[list[str], list[int]],
    label_map: Mapping[str, str],
    backbone: str,
    settings: Mapping[str, Any],
) -> None:
    """Tune function trainable: fine-tune with ``config`` (learning_rate, batch_size, weight_decay)."""
    import lightning
    import torch

    from ocm_ml.text.module import TextClassifier, TextDataset, encode_texts, load_tokenizer, make_collate

    torch.set_num_threads(int(settings["cpus_per_trial"]))
    lightning.seed_everything(int(settings["seed"]), verbose=False)
    max_length = int(settings["max_length"])
    tokenizer = load_tokenizer(backbone, max_length)
    collate = make_collate(tokenizer)
    batch_size = int(config.get("batch_size", 16))
    train_ds = TextDataset(encode_texts(tokenizer, train[0], max_length), train[1])
    val_ds = TextDataset(encode_texts(tokenizer, val[0], max_length), val[1])
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator
    )
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=max(batch_size, 64), collate_fn=collate)

    module = TextClassifier(
        backbone,
        label_map,
        learning_rate=float(config.get("learning_rate", 5e-5)),
        weight_decay=float(config.get("weight_decay", 0.01)),
        freeze_layers=int(settings["freeze_layers"]),
    )
    trainer = lightning.Trainer(
        max_epochs=int(settings["max_epochs"]),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[_make_report_callback(tokenizer, label_map)],
    )
    trainer.fit(module, train_loader, val_loader)


def train_head_trial(
    config: Mapping[str, Any],
    *,
    features: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    """Tune function trainable: an ``EmbeddingHead`` on cached embeddings (hidden, dropout, learning_rate,
    weight_decay, batch_size, class_weighting); one report per epoch with a checkpoint (head.safetensors)."""
    import torch
    from ray import tune
    from safetensors.torch import save_file

    from ocm_ml.text.head import HEAD_WEIGHTS, EmbeddingHead
    from ocm_ml.text.module import accuracy, macro_f1

    torch.set_num_threads(int(settings["cpus_per_trial"]))
    torch.manual_seed(int(settings["seed"]))
    x_train, y_train = torch.as_tensor(features["train_x"]), torch.as_tensor(features["train_y"])
    x_val, y_val = torch.as_tensor(features["val_x"]), torch.as_tensor(features["val_y"])
    num_labels = int(features["num_labels"])
    head = EmbeddingHead(x_train.shape[1], num_labels, int(config.get("hidden", 0)),
                         float(config.get("dropout", 0.0)))
    head.set_standardization(x_train)
    weight = None
    if config.get("class_weighting", "none") == "balanced":
        counts = torch.bincount(y_train, minlength=num_labels).float().clamp(min=1.0)
        weight = counts.sum() / (num_labels * counts)
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(config.get("learning_rate", 1e-3)),
                                  weight_decay=float(config.get("weight_decay", 0.0)))
    batch_size = int(config.get("batch_size", 256))
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    for epoch in range(1, int(settings["max_epochs"]) + 1):
        head.train()
        order, total = torch.randperm(len(y_train), generator=generator), 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(head(x_train[rows]), y_train[rows], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(rows)
        head.eval()
        with torch.no_grad():
            logits = head(x_val)
            val_loss = float(torch.nn.functional.cross_entropy(logits, y_val))
        pred = logits.argmax(1).numpy()
        metrics = {"epoch": epoch, "train_loss": total / len(y_train), "val_loss": val_loss,
                   "val_accuracy": accuracy(y_val.numpy(), pred),
                   "val_macro_f1": macro_f1(y_val.numpy(), pred)}
        with tempfile.TemporaryDirectory(prefix="ocm-head-ckpt-") as tmp:
            state = {k: v.contiguous() for k, v in head.state_dict().items()}
            save_file(state, str(Path(tmp) / HEAD_WEIGHTS))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _split_key(data_key: str | None, url: str, split: str, limit: int | None, seed: int) -> str:
    from ocm_ml.text.embeddings import data_md5

    return f"{data_key or data_md5(url)}-{split}-rows{limit or 'all'}-seed{seed}"


def embed_splits(
    train: tuple[list[str], list[int]],
    val: tuple[list[str], list[int]],
    backbone_dir: str,
    settings: SearchSettings,
    cache,
    keys: tuple[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cached embeddings of both splits as the head trials' ``features``, and what the cache did."""
    import numpy as np

    started = time.monotonic()
    hits, misses = cache.hits, cache.misses
    kwargs = {"actors": settings.embed_actors, "batch_size": settings.embed_batch_size,
              "layers": settings.pool_layers}
    train_x = cache.get(train[0], data_key=keys[0], backbone_dir=backbone_dir, max_length=settings.max_length,
                        **kwargs)
    val_x = cache.get(val[0], data_key=keys[1], backbone_dir=backbone_dir, max_length=settings.max_length,
                      **kwargs)
    features = {"train_x": train_x, "train_y": np.asarray(train[1], dtype=np.int64), "val_x": val_x,
                "val_y": np.asarray(val[1], dtype=np.int64)}
    info = {"cache_hits": cache.hits - hits, "cache_misses": cache.misses - misses,
            "texts_embedded": cache.texts_embedded, "seconds": round(time.monotonic() - started, 2),
            "dim": int(train_x.shape[1]), "cache_dir": str(cache.root)}
    return features, info


# --- the search -----------------------------------------------------------------------------------------


def _fit_concurrency(settings: SearchSettings) -> int:
    import ray

    if settings.max_concurrent_trials is not None:
        return settings.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, min(settings.num_trials, int(cpus // settings.cpus_per_trial)))


def _summarize(result, settings: SearchSettings) -> TrialSummary:
    history: list[dict[str, Any]] = []
    df = result.metrics_dataframe
    if df is not None and not df.empty and "epoch" in df:
        keep = [c for c in ("epoch", "val_loss", "val_accuracy", "val_macro_f1", "train_loss") if c in df]
        for row in df[keep].to_dict("records"):
            row["epoch"] = int(row["epoch"])
            history.append({k: (float(v) if k != "epoch" else v) for k, v in row.items()})
    values = [h[settings.metric] for h in history if settings.metric in h]
    best = (max if settings.mode == "max" else min)(values) if values else None
    errored = result.error is not None
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    return TrialSummary(
        trial_id=str(trial_id),
        config={k: result.config[k] for k in sorted(result.config)},
        history=history,
        best_metric=best,
        epochs_run=len(history),
        stopped_early=(not errored) and len(history) < settings.max_epochs,
        status="ERROR" if errored else "TERMINATED",
        error=None if not errored else f"{type(result.error).__name__}: {result.error}",
    )


def _local_checkpoint_dir(checkpoint, fallback_parent: str | None) -> str:
    """Where the best checkpoint stays for the steps after the search: in the checkpoint storage, where Tune
    wrote it, never in a temp folder of the process (or pod) that ran the search. A checkpoint on the local
    filesystem is its folder under ``storage_path``; one on remote storage (S3 on the cluster) is its URI,
    ``s3://bucket/key``, which a reader copies into a temporary folder of its own and removes after use
    (``pyarrow.fs.copy_files`` with the ``CheckpointStorage`` filesystem). ``fallback_parent`` is unused and
    kept for callers."""
    import pyarrow.fs

    del fallback_parent
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    scheme = checkpoint.filesystem.type_name  # "s3", "gcs", ...
    return f"{scheme}://{checkpoint.path.lstrip('/')}"


def _check_layers(backbone_dir: str | Path, setting: str, wanted: int) -> None:
    """Refuse, before any trial starts, a ``freeze_layers`` (fine-tuning) or ``pool_layers`` (embeddings) the
    backbone does not have (each trial would otherwise fail with the same error)."""
    config = Path(backbone_dir) / "config.json"
    if not config.is_file():
        return  # not a local transformers folder: TextClassifier checks the loaded model itself
    layers = json.loads(config.read_text()).get("num_hidden_layers")
    if isinstance(layers, int) and wanted > layers:
        raise ValueError(
            f"SearchSettings.{setting}={wanted} but the backbone {backbone_dir} has only {layers} "
            f"encoder layers: set {setting} to at most {layers}"
        )


def run_search(
    train_url: str,
    val_url: str,
    label_map: Mapping[str, str],
    backbone: str | None,
    settings: SearchSettings,
    storage_path: str,
    run_name: str,
    *,
    cache_dir: str | None = None,
    data_keys: Mapping[str, str] | None = None,
) -> SearchResult:
    """ASHA search over ``settings.space()`` on the already initialised Ray; returns the summary.

    ``method="embeddings"``: both splits are embedded once through ``EmbeddingCache(cache_dir)`` (default:
    ``<storage_path>/embedding-cache``), keyed by ``data_keys`` (``{"train": md5, "val": md5}``, the
    registry's content md5s; without them, the md5 of the files) and the backbone; the trials fit heads on
    the cached features; the best head is saved with the backbone as the model folder.
    ``method="finetune"``: each trial fine-tunes the transformer.

    Fails fast (``ValueError``) on invalid settings, search space, label map, backbone or data before any
    trial starts; raises ``RuntimeError`` if every trial failed.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ocm_ml.text.backbone import resolve_backbone
    from ocm_ml.text.module import check_label_map

    label_map = check_label_map(label_map)
    backbone_dir = resolve_backbone(backbone)
    param_space = build_search_space(settings.space(), settings.method)
    train = load_split(train_url, label_map, settings.row_limit, settings.seed)
    val = load_split(val_url, label_map, settings.val_row_limit, settings.seed)

    if "://" not in str(storage_path):
        storage_path = str(Path(storage_path).expanduser().resolve())
        Path(storage_path).mkdir(parents=True, exist_ok=True)

    embedding: dict[str, Any] = {}
    if settings.method == "embeddings":
        from ocm_ml.text.embeddings import EmbeddingCache

        if cache_dir is None and "://" in str(storage_path):
            raise ValueError("method 'embeddings' with remote checkpoint storage needs a local cache_dir")
        _check_layers(backbone_dir, "pool_layers", settings.pool_layers)
        cache = EmbeddingCache(cache_dir or Path(storage_path) / "embedding-cache")
        keys = (data_keys or {})
        train_key = _split_key(keys.get("train"), train_url, "train", settings.row_limit, settings.seed)
        val_key = _split_key(keys.get("val"), val_url, "val", settings.val_row_limit, settings.seed)
        features, embedding = embed_splits(train, val, backbone_dir, settings, cache, (train_key, val_key))
        features["num_labels"] = len(label_map)
        trial_fn = tune.with_parameters(train_head_trial, features=features, settings=asdict(settings))
    else:
        _check_layers(backbone_dir, "freeze_layers", settings.freeze_layers)
        trial_fn = tune.with_parameters(train_trial, train=train, val=val, label_map=label_map,
                                        backbone=backbone_dir, settings=asdict(settings))
    trainable = tune.with_resources(trial_fn, {"cpu": settings.cpus_per_trial})
    scheduler = ASHAScheduler(
        metric=settings.metric,
        mode=settings.mode,
        time_attr="training_iteration",
        max_t=settings.max_epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    ) if settings.scheduler == "asha" else FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=settings.num_trials,
            scheduler=scheduler,
            # the concurrency limit goes to the generator: Tune ignores max_concurrent_trials beside one
            search_alg=BasicVariantGenerator(
                max_concurrent=_fit_concurrency(settings), random_state=settings.seed
            ),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute=settings.metric,
                checkpoint_score_order=settings.mode,
            ),
            verbose=0,
        ),
    )
    started = time.monotonic()
    grid = tuner.fit()
    wall = time.monotonic() - started

    # ResultGrid iterates through __getitem__/__len__ only, which its stubs do not call Iterable
    results = [grid[i] for i in range(len(grid))]
    trials = [_summarize(r, settings) for r in results]
    scored = [
        (t, r) for t, r in zip(trials, results, strict=True) if t.best_metric is not None and r.error is None
    ]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no metrics reported"
        raise RuntimeError(f"text search {run_name!r}: no trial produced a result ({errors})")
    pick = max if settings.mode == "max" else min
    # every scored trial has a best_metric (filtered above)
    best_trial, best_result = pick(scored, key=lambda tr: cast(float, tr[0].best_metric))
    best_epoch = pick(
        (h for h in best_trial.history if settings.metric in h), key=lambda h: h[settings.metric]
    )
    checkpoint = best_result.get_best_checkpoint(settings.metric, settings.mode) or best_result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"text search {run_name!r}: best trial {best_trial.trial_id} has no checkpoint")

    checkpoint_dir = _local_checkpoint_dir(checkpoint, storage_path if "://" not in storage_path else None)
    if settings.method == "embeddings":
        checkpoint_dir = _head_model_dir(checkpoint_dir, best_trial.config, backbone_dir, label_map, settings,
                                         embedding["dim"], _final_dir(grid.experiment_path))
    return SearchResult(
        trials=trials,
        best_trial_id=best_trial.trial_id,
        best_config=best_trial.config,
        best_metrics={
            k: best_epoch[k] for k in ("val_accuracy", "val_macro_f1", "val_loss", "epoch") if k in best_epoch
        },
        best_checkpoint_dir=checkpoint_dir,
        trial_epochs_run=sum(t.epochs_run for t in trials),
        trial_epochs_budget=settings.num_trials * settings.max_epochs,
        num_stopped_early=sum(t.stopped_early for t in trials),
        experiment_path=grid.experiment_path,
        wall_time_s=round(wall, 2),
        embedding=embedding,
    )


def _head_model_dir(checkpoint_dir: str, config: Mapping[str, Any], backbone_dir: str, label_map, settings,
                    dim: int, target: Path) -> str:
    """The best head (its best epoch's checkpoint) with the backbone and tokenizer: the model folder."""
    from safetensors.torch import load_file

    from ocm_ml.text.head import HEAD_WEIGHTS, EmbeddingHead, save_head_model_dir

    head = EmbeddingHead(dim, len(label_map), int(config.get("hidden", 0)), float(config.get("dropout", 0.0)))
    head.load_state_dict(load_file(str(Path(checkpoint_dir) / HEAD_WEIGHTS)))
    return save_head_model_dir(backbone_dir, head, label_map, settings.max_length, target,
                               extra={"trained_on": "cached mean-pooled embeddings", "config": dict(config)},
                               layers=settings.pool_layers)


def _final_dir(experiment_path: str) -> Path:
    if "://" in str(experiment_path):  # remote storage: the model folder is written locally for registration
        return Path(tempfile.mkdtemp(prefix="ocm-text-model-"))
    return Path(experiment_path) / "best-model"

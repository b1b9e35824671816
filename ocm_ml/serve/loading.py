"""Model bundles: an MLflow model plus the preprocessing of the exact data version it was trained on.

A bundle is built from a Serve ``user_config`` (see :class:`ServeConfig`)::

    bundle = load_bundle(ServeConfig.from_user_config({
        "kind": "image",
        "model_uri": "models:/local.fashion-mnist-classifier/3",  # or models:/name@alias, runs:/<id>/model
        "tracking_uri": "sqlite:////abs/.ocm/mlflow/mlflow.db",
        "registry_url": "/abs/.ocm/registry",                      # DVC data registry, path or git URL
    }))

The run's tag ``dvc_data_version`` (a registry tag such as ``fashion-mnist-v1.0.0``) names the dataset
version; its ``<dataset>/metadata.json`` is read with ``dvc.api.read(..., rev=<dvc_commit>)`` and parsed by
:func:`ocm_ml.contract.parse_metadata` (the registry's one set of rules): it gives the normalization (images)
or the label map (texts). Nothing is taken from constants.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np

from ocm_ml import contract
from ocm_ml.contract import LINEAGE_TAGS, ContractError, DatasetMetadata
from ocm_ml.serve.validation import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TEXT_LENGTH,
    Limits,
    default_max_body_bytes,
    redact_credentials,
    url_credentials,
)

KINDS = ("image", "text")
BATCHERS = ("adaptive", "serve")
CHALLENGER_MODES = ("canary", "shadow")


class LoadError(RuntimeError):
    """A model bundle could not be built: the message says which step failed and what to check."""


@dataclass(frozen=True)
class ServeConfig:
    """A deployment's ``user_config``, validated. Unknown keys are refused so that typos surface.

    Model keys (changing them reloads the model): ``model_uri``, ``tracking_uri``, ``registry_uri``
    (MLflow model registry, defaults to the tracking URI), ``registry_url`` (DVC data registry),
    ``kind``. Serving keys (applied at once): ``max_batch`` (request cap), ``max_text_length``,
    ``max_body_bytes`` (default: derived from ``max_batch``, see
    :func:`~ocm_ml.serve.validation.default_max_body_bytes`), ``batcher``, ``max_batch_size`` and
    ``batch_wait_timeout_s`` (dynamic batching: ``"adaptive"`` forms a batch when the model is free,
    ``"serve"`` is Ray's ``@serve.batch``), ``max_queued_items`` (images or texts that may wait in the
    adaptive batcher's queue, default ``2 * max_batch``; beyond it a request gets 503 with Retry-After),
    ``torch_threads`` (intra-op threads of the replica; Ray sets 1 for a ``num_cpus=1`` replica),
    ``warmup`` (run a forward pass at load).

    URIs must not carry credentials (``https://user:token@host``): the user_config is shown by the Ray
    dashboard and ``serve status``. The replica's environment holds them instead (see
    :data:`CREDENTIAL_HINT`).

    Challenger keys: ``challenger_uri`` (a second model, same registries), ``challenger_mode``
    (``"canary"``: a ``challenger_share`` of the requests is answered by it, and the answer names it;
    ``"shadow"``: every batch is mirrored to it off the request path and only its agreement with the
    champion is recorded, in /info ``serving.challenger``).
    """

    kind: str = "image"
    model_uri: str | None = None
    tracking_uri: str | None = None
    registry_uri: str | None = None
    registry_url: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH
    max_body_bytes: int | None = None
    batcher: str = "adaptive"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.0
    max_queued_items: int | None = None
    torch_threads: int | None = None
    warmup: bool = True
    challenger_uri: str | None = None
    challenger_mode: str = "canary"
    challenger_share: float = 0.0
    #: The replica's prediction log (:class:`ocm_ml.serve.prediction_log.LogSettings`); None: off.
    prediction_log: dict[str, Any] | None = None

    MODEL_KEYS = ("kind", "model_uri", "tracking_uri", "registry_uri", "registry_url")
    URI_KEYS = ("model_uri", "tracking_uri", "registry_uri", "registry_url", "challenger_uri")
    CREDENTIAL_HINT = (
        "pass credentials through the replica's environment instead: MLflow reads MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), git its credential helper or "
        "~/.git-credentials, DVC its remote's own credential config (`dvc remote modify --local`, or the "
        "cloud's variables such as AWS_ACCESS_KEY_ID); set them on the Ray nodes (e.g. from a Kubernetes "
        "Secret), not in a runtime_env, which the dashboard shows too"
    )

    def __post_init__(self) -> None:
        for key in self.URI_KEYS:
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {type(value).__name__}")
            if url_credentials(value):
                raise ValueError(
                    f"{key} {redact_credentials(value)!r} carries credentials in its URL, and the "
                    f"user_config is visible in the Ray dashboard and Serve's status: {self.CREDENTIAL_HINT}"
                )
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.model_uri is not None and not self.registry_url:
            raise ValueError(
                "registry_url (the DVC data registry) is required with model_uri: the preprocessing comes "
                "from the model's data version in that registry"
            )
        if self.batcher not in BATCHERS:
            raise ValueError(f"batcher must be one of {BATCHERS}, got {self.batcher!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.challenger_mode not in CHALLENGER_MODES:
            raise ValueError(
                f"challenger_mode must be one of {CHALLENGER_MODES}, got {self.challenger_mode!r}")
        if not 0.0 <= self.challenger_share <= 1.0:
            raise ValueError(f"challenger_share must be within 0-1, got {self.challenger_share}")
        if self.challenger_uri is not None and self.model_uri is None:
            raise ValueError("challenger_uri needs a model_uri (the champion) too")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.max_queued_items is not None and (
                isinstance(self.max_queued_items, bool) or not isinstance(self.max_queued_items, int)
                or self.max_queued_items < 1):
            raise ValueError(f"max_queued_items must be a positive integer, got {self.max_queued_items!r}")
        self.limits  # noqa: B018 - validates the limits
        from ocm_ml.serve.prediction_log import LogSettings

        LogSettings.from_config(self.prediction_log)

    @classmethod
    def from_user_config(cls, user_config: dict[str, Any] | None) -> ServeConfig:
        config = dict(user_config or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown user_config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**config)

    @property
    def limits(self) -> Limits:
        body = self.max_body_bytes
        if body is None and isinstance(self.max_batch, int) and isinstance(self.max_text_length, int):
            body = default_max_body_bytes(self.kind, self.max_batch, self.max_text_length)
        # body is None only when max_batch or max_text_length is not an int, which Limits refuses first
        return Limits(max_batch=self.max_batch, max_text_length=self.max_text_length,
                      max_body_bytes=cast(int, body))

    @property
    def queued_items_limit(self) -> int:
        """Items (images or texts) that may wait in the adaptive batcher's queue."""
        return self.max_queued_items if self.max_queued_items is not None else 2 * self.max_batch

    def challenger_config(self) -> ServeConfig | None:
        """The challenger's own config (same registries and settings), or None."""
        if self.challenger_uri is None:
            return None
        return replace(self, model_uri=self.challenger_uri, challenger_uri=None)

    def model_key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.MODEL_KEYS)


# --- MLflow -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedModel:
    """Where a model URI points: the URI to load (aliases pinned to a version) and its lineage."""

    requested_uri: str
    load_uri: str
    # where the model's files are (file://, s3://, ...), found with this config's client
    artifact_location: str
    run_id: str
    model_name: str | None
    model_version: str | None
    run_tags: dict[str, str]
    training_time: str | None


_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
_RUNS_RE = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def resolve_model(model_uri: str, client: Any) -> ResolvedModel:
    """Resolve ``models:/name/<version|stage>``, ``models:/name@alias`` or ``runs:/id/path`` to its run."""
    from mlflow.exceptions import MlflowException

    name = version = path = None
    try:
        if match := _MODELS_RE.match(model_uri):
            name = match["name"]
            if match["alias"]:
                mv = client.get_model_version_by_alias(name, match["alias"])
            elif match["version"].isdigit():
                mv = client.get_model_version(name, match["version"])
            else:
                latest = client.get_latest_versions(name, stages=[match["version"]])
                if not latest:
                    raise LoadError(f"no version of {name} is in stage {match['version']!r}")
                mv = latest[0]
            version = str(mv.version)
            run_id = mv.run_id
            load_uri = f"models:/{name}/{version}"
        elif match := _RUNS_RE.match(model_uri):
            run_id, path, load_uri = match["run_id"], match["path"], model_uri
        else:
            raise LoadError(
                f"unsupported model_uri {model_uri!r}: use models:/<name>/<version>, models:/<name>@<alias> "
                "or runs:/<run_id>/<path>"
            )
        if not run_id:
            raise LoadError(f"{model_uri} has no MLflow run, so its data version is unknown")
        run = client.get_run(run_id)
        if name is not None:
            location = client.get_model_version_download_uri(name, version)
        else:
            location = _run_model_location(client, run, cast(str, path))
    except MlflowException as exc:
        raise LoadError(f"cannot resolve {model_uri} in MLflow: {exc.message}") from exc
    start = run.info.start_time
    training_time = datetime.fromtimestamp(start / 1000, tz=UTC).isoformat() if start else None
    return ResolvedModel(
        requested_uri=model_uri,
        load_uri=load_uri,
        artifact_location=location,
        run_id=run_id,
        model_name=name,
        model_version=version,
        run_tags=dict(run.data.tags),
        training_time=training_time,
    )


# --- DVC registry -------------------------------------------------------------------------------------------


def dataset_of_tag(tag: str) -> str:
    try:
        return contract.parse_tag(tag)[0]
    except ContractError as exc:
        raise LoadError(f"run tag dvc_data_version: {exc}") from None


def read_dataset_metadata(registry_url: str, tag: str, commit: str | None) -> tuple[DatasetMetadata, str]:
    """``<dataset>/metadata.json`` of data version ``tag`` at registry commit ``commit`` (the run's
    ``dvc_commit``: a tag moved or deleted later changes nothing), parsed and checked, and the md5 of its
    bytes."""
    import dvc.api

    if not commit:
        raise LoadError(
            f"the model's run has no 'dvc_commit' tag, so the exact registry revision of {tag} is unknown; "
            "retrain it with ocm (every ocm run records the commit it trained on)"
        )
    path = contract.metadata_path(dataset_of_tag(tag))
    try:
        text = dvc.api.read(path, repo=registry_url, rev=commit, mode="r")
    except Exception as exc:
        raise LoadError(
            f"cannot read {path} of {tag} at commit {commit[:10]} from the data registry {registry_url}: "
            f"{exc}"
        ) from exc
    try:
        metadata = contract.parse_metadata(text, where=f"{path} of {tag} at {commit[:10]}")
    except ContractError as exc:
        raise LoadError(str(exc)) from None
    return metadata, hashlib.md5(text.encode()).hexdigest()


# --- bundles ------------------------------------------------------------------------------------------------


@dataclass
class ModelBundle:
    """A loaded model and everything /info reports about it. Immutable once built; swapped whole."""

    kind: str
    model_uri: str
    model: Any
    resolved: ResolvedModel
    data_version: str
    metadata: dict[str, Any]
    metadata_md5: str
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def describe(self) -> dict[str, Any]:
        tags = self.resolved.run_tags
        return {
            "kind": self.kind,
            "model_uri": self.model_uri,
            "resolved_model_uri": self.resolved.load_uri,
            "model_name": self.resolved.model_name,
            "model_version": self.resolved.model_version,
            "run_id": self.resolved.run_id,
            "data_version": self.data_version,
            "dataset": dataset_of_tag(self.data_version),
            "dvc_commit": tags.get("dvc_commit"),
            "training_time": self.resolved.training_time,
            "dagster_run_id": tags.get("dagster_run_id"),
            "metadata_md5": self.metadata_md5,
            "run_tags": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
            "loaded_at": self.loaded_at,
        }

    def predict(self, inputs: Any, /) -> tuple[Any, Any]:
        """Validated inputs → (class ids or labels, confidences); each kind of bundle answers its own way."""
        raise NotImplementedError(f"{type(self).__name__} does not predict; use an ImageBundle or TextBundle")

    @property
    def class_names(self) -> list[str]:
        """The output classes in class-id order (images: the model's classes; texts: the label map's
        names)."""
        raise NotImplementedError(f"{type(self).__name__} has no classes; use an ImageBundle or TextBundle")


@dataclass
class ImageBundle(ModelBundle):
    """``model`` is the image predictor (``predict(pixels) -> (ids, confidences)``, ``mean``, ``std``,
    ``class_names``): the registered model's own, or one built around a bare torch model."""

    @property
    def mean(self) -> float:
        return float(self.model.mean)

    @property
    def std(self) -> float:
        return float(self.model.std)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.model.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 784) pixels in 0–255 → (class ids, confidences)."""
        return self.model.predict(pixels)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "normalization_params": {"mean": self.mean, "std": self.std},
            "output_classes": list(self.classes),
        }


@dataclass
class TextBundle(ModelBundle):
    label_map: dict[str, str] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return [self.label_map[k] for k in sorted(self.label_map, key=int)]

    def predict(self, texts: Sequence[str]) -> tuple[list[str], list[float]]:
        """Texts → (labels, confidences) through the pyfunc's ``predict(DataFrame[text])``."""
        import pandas as pd

        output = self.model.predict(pd.DataFrame({"text": list(texts)}))
        return normalize_text_output(output, len(texts), self.label_map)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "label_map": dict(self.label_map)}


def _label(value: Any, label_map: dict[str, str]) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int | float) and float(value).is_integer():
        key = str(int(value))
        return label_map.get(key, key)
    text = str(value)
    return label_map.get(text, text)


def normalize_text_output(output: Any, n: int, label_map: dict[str, str]) -> tuple[list[str], list[float]]:
    """Accept the shapes a text pyfunc may return: a DataFrame or records with ``label``/``confidence``
    (or ``label_id``/``prediction`` and ``score``/``probability``), or an (N, C) probability array."""
    import pandas as pd

    label_keys = ("label", "label_id", "prediction", "predicted_label")
    conf_keys = ("confidence", "score", "probability")
    if isinstance(output, pd.DataFrame):
        records = output.to_dict("records")
    elif isinstance(output, list | tuple) and output and isinstance(output[0], dict):
        records = list(output)
    else:
        arr = np.asarray(output)
        if arr.ndim == 2 and arr.shape[0] == n and np.issubdtype(arr.dtype, np.number):
            idx = arr.argmax(axis=1)
            return [_label(i, label_map) for i in idx], [float(arr[k, i]) for k, i in enumerate(idx)]
        raise LoadError(f"text model returned {type(output).__name__} of shape {arr.shape}; expected labels")
    if len(records) != n:
        raise LoadError(f"text model returned {len(records)} rows for {n} texts")
    labels, confs = [], []
    for rec in records:
        label_key = next((k for k in label_keys if k in rec), None)
        conf_key = next((k for k in conf_keys if k in rec), None)
        if label_key is None or conf_key is None:
            raise LoadError(f"text model output lacks a label or confidence column: {sorted(rec)}")
        labels.append(_label(rec[label_key], label_map))
        confs.append(float(rec[conf_key]))
    return labels, confs


def _image_predictor(model: Any, metadata: DatasetMetadata, data_version: str):
    """An ImagePredictor around a bare torch model (MLflow's pytorch flavour) and its data version's
    normalization and classes (numbered when metadata.json names none)."""
    from ocm_ml.vision.predictor import ImagePredictor

    norm = metadata.normalization
    if norm is None:
        raise LoadError(
            f"metadata.json of {data_version} has no normalization {{mean, std}}: an image model needs it")
    n_outputs = None
    try:
        import torch

        with torch.inference_mode():
            n_outputs = int(model.eval()(torch.zeros(2, 1, 28, 28)).shape[1])
    except Exception as exc:
        raise LoadError(
            f"the model failed a batch-of-2 forward pass ({exc}); models logged with torch.export and a "
            "batch-1 input example are locked to batch 1: log them with a batch >= 2 example"
        ) from exc
    classes = metadata.class_names or tuple(str(i) for i in range(n_outputs))
    if n_outputs != len(classes):
        raise LoadError(
            f"the model has {n_outputs} outputs but metadata.json of {data_version} lists "
            f"{len(classes)} classes"
        )
    return ImagePredictor(model, norm.mean, norm.std, classes)


def _image_bundle(model: Any, common: dict[str, Any], metadata: dict[str, Any], warmup: bool) -> ImageBundle:
    bundle = ImageBundle(model=model, metadata=metadata, **common)
    if warmup:
        try:
            bundle.predict(np.zeros((2, 784), dtype=np.float32))
        except Exception as exc:
            raise LoadError(f"{common['model_uri']} failed a warm-up prediction: {exc}") from exc
    return bundle


def _text_bundle(model: Any, common: dict[str, Any], metadata: DatasetMetadata, warmup: bool) -> TextBundle:
    label_map = metadata.label_map
    if label_map is None:
        raise LoadError(f"metadata.json of {common['data_version']} has no label_map: a text model needs it")
    bundle = TextBundle(model=model, metadata=dict(metadata.raw), label_map=dict(label_map),
                        **common)
    if warmup:
        try:
            bundle.predict(["warm-up"])
        except Exception as exc:
            raise LoadError(f"{common['model_uri']} failed a warm-up prediction: {exc}") from exc
    return bundle


def _run_model_location(client: Any, run: Any, path: str) -> str:
    """Where ``runs:/<run>/<path>`` keeps its files: the run's logged model of that name (MLflow 3), else the
    run's own artifact folder (models logged by MLflow 2)."""
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{path}'")
    if models:
        return models[0].artifact_location
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"


def _flavor(model_dir: str) -> str:
    """``"pytorch"`` for a bare torch model (MLflow's pytorch flavour), else ``"pyfunc"``."""
    from mlflow.models import Model

    flavors = Model.load(model_dir).flavors
    loader = (flavors.get("python_function") or {}).get("loader_module")
    return "pytorch" if loader == "mlflow.pytorch" or "python_function" not in flavors else "pyfunc"


def _download_and_load(config: ServeConfig, location: str) -> tuple[Any, str]:
    """(model, flavour): the model's files fetched from their artifact location (found by ``resolve_model``
    with this config's own client: MLflow's ``models:/`` download reads the process-wide registry URI, so no
    ``models:/`` URI is downloaded here and no global MLflow state is set) and loaded from disk."""
    import tempfile

    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory(prefix="ocm-model-") as scratch:
        local = download_artifacts(
            artifact_uri=location, dst_path=scratch, tracking_uri=config.tracking_uri,
            registry_uri=config.registry_uri or config.tracking_uri)
        flavor = _flavor(local)
        if flavor == "pytorch":
            import mlflow.pytorch as mlflow_pytorch

            return mlflow_pytorch.load_model(local, map_location="cpu"), flavor
        return mlflow.pyfunc.load_model(local), flavor  # ocm's pyfuncs read their files in load_context


def load_bundle(config: ServeConfig) -> ModelBundle:
    """Resolve, download and load the model of ``config`` with the preprocessing it was trained with.

    An ocm image model carries its normalization and classes inside (see :mod:`ocm_ml.vision.predictor`);
    other models get them from ``metadata.json`` at the run's ``dvc_commit`` in the data registry, never
    from a tag that may have moved since. Raises :class:`LoadError` with the failing step; nothing global
    changes on failure.
    """
    if config.model_uri is None:
        raise LoadError("no model_uri in the user_config")
    from mlflow.tracking import MlflowClient

    # ServeConfig.__post_init__ refuses a model_uri without a registry_url
    registry_url = cast(str, config.registry_url)

    client = MlflowClient(tracking_uri=config.tracking_uri,
                          registry_uri=config.registry_uri or config.tracking_uri)
    resolved = resolve_model(config.model_uri, client)
    tag = resolved.run_tags.get("dvc_data_version")
    if not tag:
        raise LoadError(
            f"run {resolved.run_id} of {config.model_uri} has no 'dvc_data_version' tag, so the data version "
            "(and its normalization or label map) is unknown"
        )
    commit = resolved.run_tags.get("dvc_commit")
    try:
        model, flavor = _download_and_load(config, resolved.artifact_location)
    except Exception as exc:
        raise LoadError(f"cannot load {resolved.load_uri} from MLflow: {exc}") from exc
    common = dict(kind=config.kind, model_uri=config.model_uri, resolved=resolved, data_version=tag)
    if config.kind == "text":
        metadata, md5 = read_dataset_metadata(registry_url, tag, commit)
        return _text_bundle(model, {**common, "metadata_md5": md5}, metadata, config.warmup)
    predictor = getattr(model.unwrap_python_model(), "predictor", None) if flavor == "pyfunc" else None
    if predictor is not None:  # ocm's own image model: the preprocessing travels with it
        metadata = predictor.preprocessing()
        md5 = hashlib.md5(json.dumps(metadata, sort_keys=True).encode()).hexdigest()
    elif flavor == "pytorch":
        parsed, md5 = read_dataset_metadata(registry_url, tag, commit)
        predictor = _image_predictor(model, parsed, tag)
        metadata = dict(parsed.raw)
    else:
        raise LoadError(
            f"{resolved.load_uri} is a pyfunc model without an image predictor: log image models with "
            "ocm_ml.vision.registered.log_image_model (or MLflow's pytorch flavour)"
        )
    return _image_bundle(predictor, {**common, "metadata_md5": md5}, metadata, config.warmup)

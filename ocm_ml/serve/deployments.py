"""Ray Serve deployments of the two families (the replica classes :class:`ImageEndpoint` and
:class:`TextEndpoint`) and :func:`build_app`, which turns a user_config into the ``serve.Application`` that
``ocm_resources.serve_control.ServeControl`` runs, updates and watches.

Each replica loads its model bundle once (in ``reconfigure``, from the ``user_config``; see
:class:`~ocm_ml.serve.loading.ServeConfig` for the keys), serves the FastAPI app of
:mod:`ocm_ml.serve.app` as its ingress, batches requests dynamically (``batcher="adaptive"``, the
default, or Ray's ``@serve.batch`` with ``batcher="serve"``) and runs inference under
``torch.inference_mode`` in one inference thread, so the event loop keeps parsing requests meanwhile.

Hot reload: a new ``user_config`` reaches the live replicas through ``reconfigure``; the new bundle is
loaded completely in a loader thread while the old one keeps answering, then swapped in with one
assignment. A batch uses the bundle it started with, so every answer names the model that produced it.
A failed reload keeps the old model and is reported by ``/health`` (``last_reload_error``,
``failed_revision``), which ``ServeControl.run`` reads before it rolls the user_config back.

Canary / shadow: ``challenger_uri`` loads a second bundle into the same replicas. ``challenger_mode=
"canary"`` answers ``challenger_share`` of the requests with it (the response's ``model_uri`` says so);
``"shadow"`` mirrors every batch to it off the request path and reports its agreement with the champion
in ``/info`` (``serving.challenger``). Same hop, same batching, same hot reload as the champion.
The two models' parts of a batch fail independently: when the challenger raises, the champion answers
the challenger's requests instead (their ``model_uri`` names the champion), and the failure is counted in
``canary_errors`` (and ``canary_fallbacks``, with ``canary_last_error``) for the canary judge; the
champion's own requests never see it. A shadow challenger's failures are only counted.

Limits: a request body over ``max_body_bytes`` is refused from its Content-Length or while it streams
(413); a full queue gets 503 with Retry-After, from Serve (``max_queued_requests``, answered by the proxy
or, under direct ingress, by the replica with the deployment's ``backpressure_config``) or from the
adaptive batcher (``max_queued_items``). No URL credentials: :class:`ServeConfig` refuses them, and every
error text that reaches /health, /info or the log has URL user-info redacted.

Throughput: start the cluster with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct ingress): each replica
then also answers on its own port, without Serve's Python proxy; ``ServeControl.urls`` lists both.

Usage (on a long-lived cluster, e.g. ``ray start --head``)::

    user_config = {"model_uri": "models:/local.fashion-mnist-classifier@champion",
                   "tracking_uri": "sqlite:////abs/mlflow.db", "registry_url": "/abs/registry"}
    app = build_app("image", user_config, version=git_commit)
    ServeControl(address="auto").run("fashion_mnist", app, config_hash(user_config))
    # http://127.0.0.1:8000/fashion_mnist/predict
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, cast

import numpy as np
import orjson
from ray import serve

from ocm_ml.serve.app import create_app
from ocm_ml.serve.batching import AdaptiveBatcher, QueueFull
from ocm_ml.serve.loading import LoadError, ModelBundle, ServeConfig, load_bundle, resolve_model
from ocm_ml.serve.prediction_log import LogSettings, PredictionRecorder
from ocm_ml.serve.validation import redact_credentials, url_credentials

logger = logging.getLogger("ray.serve")

#: Serve deployment names (stable: RayService configs and Serve's state use them).
DEPLOYMENT_NAMES = {"image": "ImageClassifier", "text": "TextClassifier"}
DEFAULT_RAY_ACTOR_OPTIONS = {"num_cpus": 1.0}
#: Requests that may wait for a replica slot (per proxy/handle; per replica under direct ingress) before
#: Serve answers 503. At ~800 single-image requests/s this is about 0.2 s of waiting.
DEFAULT_MAX_QUEUED_REQUESTS = 128
#: Retry-After (seconds) on Serve's 503 when that queue is full.
DEFAULT_RETRY_AFTER_S = 1.0
_SECRET_ENV_RE = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)


def config_hash(user_config: dict[str, Any] | None) -> str:
    return hashlib.sha1(orjson.dumps(user_config or {}, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class _Classifier:
    """Shared replica logic; the concrete deployments only fix ``kind``."""

    kind: str = ""  # a class attribute; typed like an instance one so that the class satisfies app.Backend
    #: Serve's RequestIdMiddleware (proxy and direct ingress) returns X-Request-Id: the app must not add one.
    server_sets_request_id: ClassVar[bool] = True

    def __init__(self) -> None:
        self.started_at = time.monotonic()
        self.bundle: ModelBundle | None = None
        self.config = ServeConfig(kind=self.kind)
        self.limits = self.config.limits
        self.last_reload_error: str | None = None
        self.applied_hash: str | None = None
        self.failed_hash: str | None = None
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocm-infer")
        self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocm-load")
        self._adaptive: AdaptiveBatcher = AdaptiveBatcher(
            self._run_batch, self.config.max_batch_size, self.config.batch_wait_timeout_s,
            self.config.queued_items_limit,
        )
        self._reload_lock: asyncio.Lock | None = None
        # Canary / shadow: a second bundle in the same replica (one hop, same batching, same hot reload).
        self.challenger: ModelBundle | None = None
        self._challenger_key: tuple[Any, ...] | None = None
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocm-shadow")
        self._shadow_tasks: set[asyncio.Future] = set()
        self._rng = random.Random()
        self.challenger_stats = _new_challenger_stats()
        self._challenger_logged_at = 0.0
        self.prediction_log = PredictionRecorder()
        # Per served model version (Serve's own metrics have route, application, deployment and replica).
        from ray.serve import metrics as serve_metrics

        # cast: Ray annotates tag_keys as Tuple[str] (exactly one key), but takes a tuple of any length
        tag_keys = cast(Any, ("model_version", "data_version"))
        self._version_requests = serve_metrics.Counter(
            "ocm_requests", description="Answered /predict requests per served model version",
            tag_keys=tag_keys)
        self._version_items = serve_metrics.Counter(
            "ocm_predictions", description="Answered inputs (images or texts) per served model version",
            tag_keys=tag_keys)
        self._version_tags: tuple[Any, dict[str, str]] = (None, {})

    def __serve_build_asgi_app__(self):
        return create_app(self)

    def log_prediction(self, request_id: str | None, inputs: Any, bundle: ModelBundle, predictions: Any,
                       confidences: Any, class_ids: Any = None) -> str:
        """The app's one call per answered request: the request id (the incoming ``X-Request-Id``, else
        Serve's own id of this request), the per-version counters and, when sampled, a prediction-log
        record."""
        if not request_id:
            request_id = _serve_request_id() or uuid.uuid4().hex
        if self._version_tags[0] is not bundle:
            self._version_tags = (bundle, {"model_version": str(bundle.resolved.model_version),
                                           "data_version": str(bundle.data_version)})
        tags = self._version_tags[1]
        self._version_requests.inc(1, tags)
        self._version_items.inc(len(inputs), tags)
        if self.prediction_log.sampled():
            self.prediction_log.record(request_id, bundle, inputs, predictions, confidences, class_ids)
        return request_id

    def __del__(self) -> None:  # Serve calls it when the replica shuts down: write what is buffered
        recorder = getattr(self, "prediction_log", None)
        if recorder is not None:
            recorder.close()

    # --- inference ------------------------------------------------------------------------------------

    async def infer(self, inputs: Any) -> tuple[ModelBundle, Any, Any]:
        config = self.config
        if self.challenger is None:  # no canary running: no bookkeeping on the hot path
            return await self._submit(config, "champion", inputs)
        role = "champion"
        if config.challenger_mode == "canary" and self._rng.random() < config.challenger_share:
            role = "challenger"
        # While a challenger is loaded, both roles' requests, errors and latencies are counted: the canary
        # controller compares them (error rate, p99) before it steps the share up or rolls back. A
        # challenger's errors are counted where it failed (_challenger_failed): its requests are then
        # answered by the champion and do not raise.
        stats = self.challenger_stats
        prefix = "canary" if role == "challenger" else "champion"
        started = time.perf_counter()
        try:
            result = await self._submit(config, role, inputs)
        except QueueFull:  # refused before either model saw it
            raise
        except Exception:
            if role == "champion":
                stats["champion_errors"] += 1
            self._count(stats, prefix, started)
            raise
        self._count(stats, prefix, started)
        return result

    @staticmethod
    def _count(stats: dict[str, Any], prefix: str, started: float) -> None:
        stats[f"{prefix}_requests"] += 1
        stats[f"{prefix}_latencies_ms"].append((time.perf_counter() - started) * 1000.0)

    async def _submit(self, config: ServeConfig, role: str, inputs: Any):
        if config.batcher == "serve":
            result = await self._serve_batched((role, inputs))
        else:
            result = await self._adaptive.submit((role, inputs), len(inputs))
        if isinstance(result, BaseException):  # this request's part of the batch failed
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _serve_batched(self, items: list[Any]) -> list[Any]:
        return await self._run_batch(items)

    async def _run_batch(self, items: list[tuple[str, Any]]) -> list[Any]:
        """One forward pass per model role in the batch; each request gets the bundle that answered it, or
        the exception of its own part of the batch: the champion's and the challenger's parts fail
        independently, and the champion answers the requests of a challenger that failed."""
        # Snapshot the bundles: a reload may swap them while this batch computes.
        champion, challenger = self.bundle, self.challenger
        shadow = challenger if self.config.challenger_mode == "shadow" else None
        out: list[Any] = [None] * len(items)
        champion_idx = [i for i, (role, _) in enumerate(items) if role != "challenger"]
        challenger_idx = [i for i, (role, _) in enumerate(items) if role == "challenger"]
        if champion_idx:
            merged, answers = await self._predict_into(champion, champion_idx, items, out)
            if shadow is not None and answers is not None:
                self._shadow(shadow, merged, answers)
        if challenger_idx:
            answered = False
            if challenger is not None:  # else it was unloaded since: the champion answers
                _, answers = await self._predict_into(challenger, challenger_idx, items, out)
                answered = answers is not None
                if not answered:
                    self._challenger_failed(out[challenger_idx[0]], len(challenger_idx))
            if not answered:
                await self._predict_into(champion, challenger_idx, items, out)
        return out

    async def _predict_into(self, bundle: ModelBundle | None, idx: list[int], items: list[tuple[str, Any]],
                            out: list[Any]) -> tuple[Any, Any]:
        """One forward pass of ``bundle`` over the requests ``idx``; their answers (or the exception) go
        into ``out``. Returns (merged inputs, first outputs), or (None, None) when it failed."""
        parts = [items[i][1] for i in idx]
        try:
            if bundle is None:
                raise LoadError("no model is loaded")
            merged = self._merge(parts)
            loop = asyncio.get_running_loop()
            first, second = await loop.run_in_executor(self._infer_pool, bundle.predict, merged)
            if len(first) != len(merged) or len(second) != len(merged):
                raise RuntimeError(f"the model returned {len(first)} answers for {len(merged)} inputs")
        except Exception as exc:
            for i in idx:
                out[i] = exc
            return None, None
        start = 0
        for i, part in zip(idx, parts, strict=True):
            out[i] = (bundle, first[start : start + len(part)], second[start : start + len(part)])
            start += len(part)
        return merged, first

    def _challenger_failed(self, exc: BaseException, requests: int) -> None:
        """Count a failed challenger pass for the canary judge; its requests fall back to the champion."""
        stats = self.challenger_stats
        stats["canary_errors"] += requests
        stats["canary_fallbacks"] += requests
        reason = redact_credentials(f"{type(exc).__name__}: {exc}")
        stats["canary_last_error"] = reason
        now = time.monotonic()
        if now - self._challenger_logged_at >= 10.0:  # not once per batch under load
            self._challenger_logged_at = now
            logger.warning("challenger failed on %d request(s), the champion answered them: %s",
                           requests, reason)

    def _merge(self, parts: list[Any]) -> Any:
        if self.kind == "image":
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        return [t for texts in parts for t in texts]

    def _shadow(self, challenger: ModelBundle, merged: Any, champion_answers: Any) -> None:
        """Mirror a batch to the challenger off the request path; record agreement, never answer with it.
        Nothing here can fail the batch: every error is counted in the shadow stats."""
        stats = self.challenger_stats
        if len(self._shadow_tasks) >= 4:  # the challenger lags: drop mirrored work, not requests
            stats["shadow_skipped"] += len(champion_answers)
            return

        def run() -> None:
            try:
                answers, _ = challenger.predict(merged)
                same = sum(1 for a, b in zip(list(answers), list(champion_answers), strict=True) if a == b)
                stats["shadow_items"] += len(answers)
                stats["shadow_agreements"] += same
            except Exception as exc:
                stats["shadow_errors"] += 1
                stats["shadow_last_error"] = redact_credentials(f"{type(exc).__name__}: {exc}")

        try:
            future = asyncio.get_running_loop().run_in_executor(self._shadow_pool, run)
        except Exception as exc:  # e.g. the pool is shutting down
            stats["shadow_errors"] += 1
            stats["shadow_last_error"] = redact_credentials(f"{type(exc).__name__}: {exc}")
            return
        self._shadow_tasks.add(future)
        future.add_done_callback(self._shadow_tasks.discard)

    # --- configuration --------------------------------------------------------------------------------

    def _apply_serving(self, config: ServeConfig) -> None:
        self.limits = config.limits
        self._adaptive.set_max_batch_size(config.max_batch_size)
        self._adaptive.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._adaptive.set_max_queued_items(config.queued_items_limit)
        # cast: serve.batch gives the method set_max_batch_size/set_batch_wait_timeout_s, its type doesn't
        # say so
        serve_batched = cast(Any, self._serve_batched)
        serve_batched.set_max_batch_size(config.max_batch_size)
        serve_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)

    async def _needs_load(self, config: ServeConfig, current: ModelBundle | None,
                          current_key: tuple[Any, ...] | None) -> bool:
        model_uri = config.model_uri
        if model_uri is None:
            return False
        if current is None or config.model_key() != current_key:
            return True
        if "@" not in model_uri:
            return False
        # Same alias URI: reload only if the alias now points at another version.
        from mlflow.tracking import MlflowClient

        def _version() -> str | None:
            client = MlflowClient(tracking_uri=config.tracking_uri,
                                  registry_uri=config.registry_uri or config.tracking_uri)
            return resolve_model(model_uri, client).model_version

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._load_pool, _version) != current.resolved.model_version

    async def _load(self, config: ServeConfig) -> ModelBundle:
        t0 = time.perf_counter()
        bundle = await asyncio.get_running_loop().run_in_executor(self._load_pool, load_bundle, config)
        logger.info("loaded %s (%s) in %.1fs", config.model_uri, bundle.data_version,
                    time.perf_counter() - t0)
        return bundle

    def _reject(self, user_config: Any, reason: str) -> None:
        reason = redact_credentials(reason)
        self.last_reload_error = reason
        self.failed_hash = config_hash(user_config)
        logger.error("reconfigure rejected, still serving %s: %s",
                     self.bundle.model_uri if self.bundle else "no model", reason)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config at start and on every change. With no model
        loaded yet a failure raises (Serve reports the replica as failed); the exception is a new one with
        URL credentials redacted and no chained cause, since Serve shows and logs its text."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            error, config = None, None
            try:
                config = ServeConfig.from_user_config({"kind": self.kind, **(user_config or {})})
                if config.kind != self.kind:
                    raise ValueError(f"this is the {self.kind} deployment; "
                                     f"user_config says kind={config.kind!r}")
            except (TypeError, ValueError) as exc:
                error = f"invalid user_config: {exc}"
            if error is not None:  # raised outside the except block: no chained original text
                if self.bundle is None:
                    raise ValueError(redact_credentials(error))
                self._reject(user_config, error)
                return
            assert config is not None  # no error: from_user_config returned
            self._apply_serving(config)
            bundle = self.bundle if config.model_uri is not None else None
            challenger_config = config.challenger_config()
            challenger = self.challenger if challenger_config is not None else None
            try:
                if await self._needs_load(config, self.bundle, self.config.model_key()):
                    bundle = await self._load(config)
                if challenger_config is not None and await self._needs_load(
                        challenger_config, self.challenger, self._challenger_key):
                    challenger = await self._load(challenger_config)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                if self.bundle is None:
                    raise LoadError(redact_credentials(error))
                self._reject(user_config, error)
                return
            if challenger is not self.challenger:
                self.challenger_stats = _new_challenger_stats()
            # The swap: reference assignments, no await in between.
            self.bundle, self.challenger = bundle, challenger
            self._challenger_key = challenger_config.model_key() if challenger_config else None
            self.config = config
            self.last_reload_error = None
            self.applied_hash = config_hash(user_config)
            self.failed_hash = None
            self.prediction_log.configure(LogSettings.from_config(config.prediction_log), _replica_id())

    # --- introspection (for /info and the control helpers) --------------------------------------------

    def serving_info(self) -> dict[str, Any]:
        import torch

        batcher = self._adaptive.stats() if self.config.batcher == "adaptive" else {}
        return {
            "batcher": self.config.batcher,
            "max_batch_size": self.config.max_batch_size,
            "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
            "max_batch": self.limits.max_batch,
            "max_text_length": self.limits.max_text_length,
            "max_body_bytes": self.limits.max_body_bytes,
            "max_queued_items": (self._adaptive.max_queued_items if self.config.batcher == "adaptive"
                                 else None),
            "torch_threads": torch.get_num_threads(),
            "replica_id": _replica_id(),
            "prediction_log": self.prediction_log.info(),
            **({"batches": batcher} if batcher else {}),
            **({"challenger": self.challenger_info()} if self.challenger is not None else {}),
        }

    def challenger_info(self) -> dict[str, Any]:
        challenger, stats = self.challenger, dict(self.challenger_stats)
        items = stats["shadow_items"]
        for prefix in ("canary", "champion"):
            latencies = sorted(stats.pop(f"{prefix}_latencies_ms"))
            stats[f"{prefix}_p99_ms"] = round(_quantile(latencies, 0.99), 2) if latencies else None
            stats[f"{prefix}_p50_ms"] = round(_quantile(latencies, 0.50), 2) if latencies else None
        return {
            "mode": self.config.challenger_mode,
            "share": self.config.challenger_share if self.config.challenger_mode == "canary" else 0.0,
            "model_uri": challenger.model_uri if challenger else None,
            "model_version": challenger.resolved.model_version if challenger else None,
            "data_version": challenger.data_version if challenger else None,
            **stats,
            "shadow_agreement": round(stats["shadow_agreements"] / items, 4) if items else None,
        }

    def health_details(self) -> dict[str, Any]:
        """Extra /health fields: which replica answered and which user_config it runs (a hash), so that
        :func:`reconfigure` can tell when every replica has swapped."""
        bundle = self.bundle
        return {
            "replica_id": _replica_id(),
            "model_version": bundle.resolved.model_version if bundle else None,
            "data_version": bundle.data_version if bundle else None,
            "config_revision": self.applied_hash,
            "failed_revision": self.failed_hash,
        }


LATENCY_WINDOW = 2048  # the latest requests per role that p50/p99 are computed over


def _new_challenger_stats() -> dict[str, Any]:
    from collections import deque

    return {"canary_requests": 0, "canary_errors": 0, "canary_latencies_ms": deque(maxlen=LATENCY_WINDOW),
            "canary_fallbacks": 0, "canary_last_error": None,
            "champion_requests": 0, "champion_errors": 0,
            "champion_latencies_ms": deque(maxlen=LATENCY_WINDOW),
            "shadow_items": 0, "shadow_agreements": 0, "shadow_skipped": 0, "shadow_errors": 0,
            "shadow_last_error": None}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, int(np.ceil(q * len(sorted_values))) - 1))
    return float(sorted_values[index])


def _serve_request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        context = _get_serve_request_context()
        return context.request_id if context is not None else None
    except Exception:
        return None


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


@serve.deployment(name=DEPLOYMENT_NAMES["image"], ray_actor_options=DEFAULT_RAY_ACTOR_OPTIONS,
                  max_ongoing_requests=64)
@serve.ingress()
class ImageEndpoint(_Classifier):
    kind = "image"


@serve.deployment(name=DEPLOYMENT_NAMES["text"], ray_actor_options=DEFAULT_RAY_ACTOR_OPTIONS,
                  max_ongoing_requests=64)
@serve.ingress()
class TextEndpoint(_Classifier):
    kind = "text"


DEPLOYMENTS = {"image": ImageEndpoint, "text": TextEndpoint}


# --- building apps --------------------------------------------------------------------------------------


def _normalized_actor_options(options: dict[str, Any]) -> dict[str, Any]:
    """Serve reports resource amounts as floats; use floats too, or a redeploy with the options read back
    from Serve hashes differently and restarts the replicas instead of reconfiguring them."""
    out = dict(options)
    for key in ("num_cpus", "num_gpus"):
        if out.get(key) is not None:
            out[key] = float(out[key])
    if isinstance(out.get("resources"), dict):
        out["resources"] = {k: float(v) for k, v in out["resources"].items()}
    return out


def build_app(
    kind: str,
    user_config: dict[str, Any] | None = None,
    *,
    num_replicas: int = 1,
    max_ongoing_requests: int = 64,
    autoscaling_config: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
    retry_after_s: float | None = DEFAULT_RETRY_AFTER_S,
    version: str | None = None,
) -> serve.Application:
    """The Serve application of one family kind ("image" or "text").

    ``user_config`` is validated here (so a typo, or a URL with credentials, fails on the driver before
    anything reaches Serve) and again on each replica.
    ``max_ongoing_requests`` bounds a replica's batch: keep it >= ``max_batch_size``.
    ``max_queued_requests`` bounds the requests waiting for a replica slot (-1: unbounded); beyond it Serve
    answers 503 with ``Retry-After: retry_after_s`` (None: no header), through the proxy and under direct
    ingress alike.
    With ``autoscaling_config``, ``num_replicas`` is ignored. ``version`` is the code version (the git
    commit): the same version with another user_config or other options updates the live replicas in place
    (a hot reload), another version rolls replicas onto the new code; None lets Serve pick a new one.
    """
    if kind not in DEPLOYMENTS:
        raise ValueError(f"kind must be one of {sorted(DEPLOYMENTS)}, got {kind!r}")
    user_config = dict(user_config or {})
    config = ServeConfig.from_user_config({"kind": kind, **user_config})
    if config.kind != kind:
        raise ValueError(f"user_config kind={config.kind!r} does not match the {kind} deployment")
    if max_queued_requests != -1 and max_queued_requests < 1:
        raise ValueError(f"max_queued_requests must be >= 1 or -1 (unbounded), got {max_queued_requests}")
    _refuse_secrets_in_actor_options(ray_actor_options)
    options: dict[str, Any] = {
        "user_config": user_config,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
        "ray_actor_options": _normalized_actor_options(ray_actor_options or DEFAULT_RAY_ACTOR_OPTIONS),
        # A code rollout starts the new replicas before stopping the old ones.
        "max_surge_percent": 100,
    }
    if autoscaling_config:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    deployment = DEPLOYMENTS[kind].options(**options)
    return (_with_code_version(deployment, version) if version else deployment).bind()


def _with_code_version(deployment: serve.Deployment, version: str) -> serve.Deployment:
    """``deployment`` with code version ``version``.

    Ray 2.60: ``serve.run`` gives a deployment without a version a random one, so every update would replace
    the replicas (no hot reload), and ``Deployment.options(version=...)`` raises ("removed"); Serve's
    declarative config sets versions only through the dashboard's REST API. ``_internal=True`` is the
    option path Serve itself uses for it: ocm's one private use of a Deployment."""
    return deployment.options(version=version, _internal=True)


def rebuild_app(deployed: dict[str, Any], user_config: dict[str, Any]) -> tuple[serve.Application, str]:
    """The application that runs now (``ServeControl.deployed``: deployment, code version, options) with
    ``user_config``, and the config revision its replicas will report: an update of the user_config alone,
    in place. ``ServeControl.reconfigure`` calls it."""
    kinds = {v: k for k, v in DEPLOYMENT_NAMES.items()}
    if deployed["deployment"] not in kinds:
        raise ValueError(f"{deployed['deployment']!r} is not an ocm endpoint deployment ({sorted(kinds)})")
    options = {k: v for k, v in deployed["options"].items() if v is not None}
    app = build_app(kinds[deployed["deployment"]], user_config, version=deployed["code_version"], **options)
    return app, config_hash(user_config)


def _refuse_secrets_in_actor_options(ray_actor_options: dict[str, Any] | None) -> None:
    """A runtime_env is part of the Serve config the dashboard shows: no credentials in it."""
    env = ((ray_actor_options or {}).get("runtime_env") or {}).get("env_vars") or {}
    named = sorted(k for k, v in env.items() if _SECRET_ENV_RE.search(k) or url_credentials(str(v)))
    if named:
        raise ValueError(
            f"ray_actor_options.runtime_env.env_vars {named} look like credentials, and the Serve config "
            "(Ray dashboard, serve status) would show them: set them in the Ray nodes' own environment "
            "(e.g. from a Kubernetes Secret) instead"
        )

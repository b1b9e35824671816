"""Ray Serve deployments of the two families, and the helpers a Serve-control resource calls.

Each replica loads its model bundle once (in ``reconfigure``, from the ``user_config``; see
:class:`~ocm_ml.serve.loading.ServeConfig` for the keys), serves the FastAPI app of
:mod:`ocm_ml.serve.app` as its ingress, batches requests dynamically (``batcher="adaptive"``, the
default, or Ray's ``@serve.batch`` with ``batcher="serve"``) and runs inference under
``torch.inference_mode`` in one inference thread, so the event loop keeps parsing requests meanwhile.

Hot reload: a new ``user_config`` reaches the live replicas through ``reconfigure``; the new bundle is
loaded completely in a loader thread while the old one keeps answering, then swapped in with one
assignment. A batch uses the bundle it started with, so every answer names the model that produced it.
A failed reload keeps the old model and is reported by ``/health`` (``last_reload_error``) and by
:func:`reconfigure`, which rolls the user_config back.

Canary / shadow: ``challenger_uri`` loads a second bundle into the same replicas. ``challenger_mode=
"canary"`` answers ``challenger_share`` of the requests with it (the response's ``model_uri`` says so);
``"shadow"`` mirrors every batch to it off the request path and reports its agreement with the champion
in ``/info`` (``serving.challenger``). Same hop, same batching, same hot reload as the champion.

Throughput: start the cluster with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct ingress): each replica
then also answers on its own port, without Serve's Python proxy; :func:`endpoint_urls` lists both.

Usage (on a long-lived cluster, e.g. ``ray start --head``)::

    app = build_app("image", {"model_uri": "models:/local.fashion-mnist-classifier@champion",
                              "tracking_uri": "sqlite:////abs/mlflow.db", "registry_url": "/abs/registry"})
    deploy(app, "fashion_mnist")                      # http://127.0.0.1:8000/fashion_mnist/predict
    reconfigure("fashion_mnist", {"model_uri": "models:/local.fashion-mnist-classifier/4"})
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson
from ray import serve

from ocm_ml.serve.app import create_app
from ocm_ml.serve.batching import AdaptiveBatcher
from ocm_ml.serve.loading import LoadError, ModelBundle, ServeConfig, load_bundle, resolve_model

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAMES = {"image": "ImageClassifier", "text": "TextClassifier"}
DEFAULT_RAY_ACTOR_OPTIONS = {"num_cpus": 1.0}


class ReloadError(RuntimeError):
    """A reconfigure did not take effect on every replica; the message has the replica's reason."""


def config_hash(user_config: dict[str, Any] | None) -> str:
    return hashlib.sha1(orjson.dumps(user_config or {}, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class _Classifier:
    """Shared replica logic; the concrete deployments only fix ``kind``."""

    kind: ClassVar[str] = ""

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
            self._run_batch, self.config.max_batch_size, self.config.batch_wait_timeout_s
        )
        self._reload_lock: asyncio.Lock | None = None
        # Canary / shadow: a second bundle in the same replica (one hop, same batching, same hot reload).
        self.challenger: ModelBundle | None = None
        self._challenger_key: tuple[Any, ...] | None = None
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocm-shadow")
        self._shadow_tasks: set[asyncio.Future] = set()
        self._rng = random.Random()
        self.challenger_stats = _new_challenger_stats()

    def __serve_build_asgi_app__(self):
        return create_app(self)

    # --- inference ------------------------------------------------------------------------------------

    async def infer(self, inputs: Any) -> tuple[ModelBundle, Any, Any]:
        role = "champion"
        config = self.config
        if (self.challenger is not None and config.challenger_mode == "canary"
                and self._rng.random() < config.challenger_share):
            role = "challenger"
        if self.challenger is None:  # no canary running: no bookkeeping on the hot path
            return await self._submit(config, role, inputs)
        # While a challenger is loaded, both roles' requests, errors and latencies are counted: the canary
        # controller compares them (error rate, p99) before it steps the share up or rolls back.
        stats = self.challenger_stats
        prefix = "canary" if role == "challenger" else "champion"
        started = time.perf_counter()
        try:
            return await self._submit(config, role, inputs)
        except Exception:
            stats[f"{prefix}_errors"] += 1
            raise
        finally:
            stats[f"{prefix}_requests"] += 1
            stats[f"{prefix}_latencies_ms"].append((time.perf_counter() - started) * 1000.0)

    async def _submit(self, config: ServeConfig, role: str, inputs: Any):
        if config.batcher == "serve":
            return await self._serve_batched((role, inputs))
        return await self._adaptive.submit((role, inputs))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _serve_batched(self, items: list[Any]) -> list[tuple[ModelBundle, Any, Any]]:
        return await self._run_batch(items)

    async def _run_batch(self, items: list[tuple[str, Any]]) -> list[tuple[ModelBundle, Any, Any]]:
        """One forward pass per model role in the batch; each request gets the bundle that answered it."""
        # Snapshot the bundles: a reload may swap them while this batch computes.
        bundles = {"champion": self.bundle, "challenger": self.challenger}
        shadow = bundles["challenger"] if self.config.challenger_mode == "shadow" else None
        out: list[Any] = [None] * len(items)
        for role in ("champion", "challenger"):
            idx = [i for i, (r, _) in enumerate(items) if r == role]
            if not idx:
                continue
            bundle = bundles[role] or bundles["champion"]
            if bundle is None:
                raise LoadError("no model is loaded")
            parts = [items[i][1] for i in idx]
            merged = self._merge(parts)
            loop = asyncio.get_running_loop()
            first, second = await loop.run_in_executor(self._infer_pool, bundle.predict, merged)
            start = 0
            for i, part in zip(idx, parts, strict=True):
                out[i] = (bundle, first[start : start + len(part)], second[start : start + len(part)])
                start += len(part)
            if role == "champion" and shadow is not None:
                self._shadow(shadow, merged, first)
        return out

    def _merge(self, parts: list[Any]) -> Any:
        if self.kind == "image":
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        return [t for texts in parts for t in texts]

    def _shadow(self, challenger: ModelBundle, merged: Any, champion_answers: Any) -> None:
        """Mirror a batch to the challenger off the request path; record agreement, never answer with it."""
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
                stats["shadow_last_error"] = f"{type(exc).__name__}: {exc}"

        future = asyncio.get_running_loop().run_in_executor(self._shadow_pool, run)
        self._shadow_tasks.add(future)
        future.add_done_callback(self._shadow_tasks.discard)

    # --- configuration --------------------------------------------------------------------------------

    def _apply_serving(self, config: ServeConfig) -> None:
        self.limits = config.limits
        self._adaptive.set_max_batch_size(config.max_batch_size)
        self._adaptive.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._serve_batched.set_max_batch_size(config.max_batch_size)
        self._serve_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)

    async def _needs_load(self, config: ServeConfig, current: ModelBundle | None,
                          current_key: tuple[Any, ...] | None) -> bool:
        if config.model_uri is None:
            return False
        if current is None or config.model_key() != current_key:
            return True
        if "@" not in config.model_uri:
            return False
        # Same alias URI: reload only if the alias now points at another version.
        from mlflow.tracking import MlflowClient

        def _version() -> str | None:
            client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.registry_uri or config.tracking_uri)
            return resolve_model(config.model_uri, client).model_version

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._load_pool, _version) != current.resolved.model_version

    async def _load(self, config: ServeConfig) -> ModelBundle:
        t0 = time.perf_counter()
        bundle = await asyncio.get_running_loop().run_in_executor(self._load_pool, load_bundle, config)
        logger.info("loaded %s (%s) in %.1fs", config.model_uri, bundle.data_version, time.perf_counter() - t0)
        return bundle

    def _reject(self, user_config: Any, reason: str) -> None:
        self.last_reload_error = reason
        self.failed_hash = config_hash(user_config)
        logger.error("reconfigure rejected, still serving %s: %s",
                     self.bundle.model_uri if self.bundle else "no model", reason)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config at start and on every change."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            try:
                config = ServeConfig.from_user_config({"kind": self.kind, **(user_config or {})})
                if config.kind != self.kind:
                    raise ValueError(f"this is the {self.kind} deployment; user_config says kind={config.kind!r}")
            except (TypeError, ValueError) as exc:
                if self.bundle is None:
                    raise
                self._reject(user_config, f"invalid user_config: {exc}")
                return
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
                if self.bundle is None:
                    raise
                self._reject(user_config, f"{type(exc).__name__}: {exc}")
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
            "torch_threads": torch.get_num_threads(),
            "replica_id": _replica_id(),
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
            "champion_requests": 0, "champion_errors": 0, "champion_latencies_ms": deque(maxlen=LATENCY_WINDOW),
            "shadow_items": 0, "shadow_agreements": 0, "shadow_skipped": 0, "shadow_errors": 0,
            "shadow_last_error": None}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, int(np.ceil(q * len(sorted_values))) - 1))
    return float(sorted_values[index])


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


@serve.deployment(name=DEPLOYMENT_NAMES["image"], ray_actor_options=DEFAULT_RAY_ACTOR_OPTIONS,
                  max_ongoing_requests=64)
@serve.ingress()
class ImageClassifier(_Classifier):
    kind = "image"


@serve.deployment(name=DEPLOYMENT_NAMES["text"], ray_actor_options=DEFAULT_RAY_ACTOR_OPTIONS,
                  max_ongoing_requests=64)
@serve.ingress()
class TextClassifier(_Classifier):
    kind = "text"


DEPLOYMENTS = {"image": ImageClassifier, "text": TextClassifier}


# --- building and controlling apps ------------------------------------------------------------------------


def code_version() -> str:
    """A hash of the ocm_ml sources: equal versions let Serve apply a user_config change in place
    (``reconfigure`` on the live replicas); new code gets new replicas."""
    digest = hashlib.sha1()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return "ocm-" + digest.hexdigest()[:16]


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
    max_queued_requests: int = -1,
    version: str | None = None,
) -> serve.Application:
    """The Serve application of one family kind ("image" or "text").

    ``user_config`` is validated here (so a typo fails on the driver) and again on each replica.
    ``max_ongoing_requests`` bounds a replica's batch: keep it >= ``max_batch_size``.
    With ``autoscaling_config``, ``num_replicas`` is ignored. ``version`` pins the code version (default:
    :func:`code_version`); :func:`reconfigure` passes the running one so that it never restarts replicas.
    """
    if kind not in DEPLOYMENTS:
        raise ValueError(f"kind must be one of {sorted(DEPLOYMENTS)}, got {kind!r}")
    user_config = dict(user_config or {})
    config = ServeConfig.from_user_config({"kind": kind, **user_config})
    if config.kind != kind:
        raise ValueError(f"user_config kind={config.kind!r} does not match the {kind} deployment")
    options: dict[str, Any] = {
        "user_config": user_config,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": _normalized_actor_options(ray_actor_options or DEFAULT_RAY_ACTOR_OPTIONS),
        # A code rollout starts the new replicas before stopping the old ones.
        "max_surge_percent": 100,
    }
    if autoscaling_config:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    deployment = DEPLOYMENTS[kind].options(**options)
    # Serve gives every `serve.run` a random code version, which replaces the replicas even when only the
    # user_config changed. A version derived from the code lets a user_config change reach the live
    # replicas through `reconfigure` (the hot reload); `Deployment.options(version=...)` was removed.
    deployment._version = version or code_version()
    return deployment.bind()


def deploy(app: serve.Application, name: str, route_prefix: str | None = None):
    """Deploy (or update) ``app`` as Serve application ``name`` at ``/<name>``; returns its handle once the
    application is RUNNING. Raises if it fails to deploy (e.g. the model cannot be loaded)."""
    return serve.run(app, name=name, route_prefix=route_prefix or f"/{name}", blocking=False)


def _app_details(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(name)
    if app is None:
        raise ReloadError(f"no Serve application named {name!r}; deploy it first")
    for dep_name, dep in app.get("deployments", {}).items():
        if dep_name in DEPLOYMENT_NAMES.values():
            return app, dep
    raise ReloadError(f"application {name!r} has no ocm classifier deployment")


def _health(url: str) -> dict[str, Any] | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 while no model is loaded still has the body
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def _wait_applied(name: str, wanted: str, replicas: int, timeout_s: float) -> dict[str, Any]:
    """Poll /health until ``replicas`` distinct replicas report config revision ``wanted``; through each
    replica's own port under direct ingress, else through the proxy."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        urls = endpoint_urls(name)
        for url in urls["direct"] or [urls["proxy"]] * 4:
            status = _health(url)
            if not status or "config_revision" not in status:
                continue
            if status.get("failed_revision") == wanted:
                raise ReloadError(
                    f"replica {status.get('replica_id')} of {name!r} rejected the new user_config and still "
                    f"serves {status.get('model_uri')}: {status.get('last_reload_error')}"
                )
            if status["config_revision"] == wanted:
                seen[status.get("replica_id") or url] = status
        if len(seen) >= replicas:
            return next(iter(seen.values()))
        time.sleep(0.25)
    raise ReloadError(f"{len(seen)} of {replicas} replicas of {name!r} applied the new config within {timeout_s}s")


def reconfigure(
    name: str, user_config: dict[str, Any], *, merge: bool = True, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Hot-reload application ``name`` with ``user_config`` (merged into the current one unless
    ``merge=False``): the live replicas load the new model while serving the old one, then swap.

    Returns a replica's status after the swap. On failure the previous user_config is restored and
    :class:`ReloadError` says why.
    """
    app, dep = _app_details(name)
    dep_config = dep["deployment_config"]
    kind = next(k for k, v in DEPLOYMENT_NAMES.items() if v == dep["name"])
    old_user_config = dict(dep_config.get("user_config") or {})
    new_user_config = {**old_user_config, **user_config} if merge else dict(user_config)
    options = dict(
        num_replicas=dep_config.get("num_replicas") or 1,
        max_ongoing_requests=dep_config.get("max_ongoing_requests", 64),
        autoscaling_config=dep_config.get("autoscaling_config"),
        ray_actor_options=dep_config.get("ray_actor_options"),
        max_queued_requests=dep_config.get("max_queued_requests", -1),
    )
    from ray.serve.context import _get_global_client

    # The running code version, not the one on disk: a reconfigure changes the config, never the code.
    options["version"] = _get_global_client().get_deployment_info(dep["name"], name)[0].version
    route_prefix = app.get("route_prefix") or f"/{name}"
    deploy(build_app(kind, new_user_config, **options), name, route_prefix)
    replicas = max(1, int(dep.get("target_num_replicas") or options["num_replicas"]))
    try:
        return _wait_applied(name, config_hash(new_user_config), replicas, timeout_s)
    except ReloadError:
        if old_user_config != new_user_config:
            deploy(build_app(kind, old_user_config, **options), name, route_prefix)
        raise


def endpoint_urls(name: str) -> dict[str, Any]:
    """Where application ``name`` answers: ``proxy`` (Serve's HTTP proxy, the contract URL) and
    ``direct`` (each replica's own port when the cluster runs direct ingress,
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``; empty otherwise)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details.get("applications", {}).get(name)
    if app is None:
        raise ReloadError(f"no Serve application named {name!r}")
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    loopback = host in ("127.0.0.1", "localhost", "::1")
    proxy_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proxy = f"http://{proxy_host}:{http.get('port', 8000)}{prefix}"
    direct = []
    for group in details.get("target_groups", []):
        if group.get("app_name") == name and str(group.get("protocol", "")).upper().endswith("HTTP"):
            for target in group.get("targets", []):
                if target.get("port") != http.get("port"):
                    # Replicas bind the proxy's host: on a loopback-only cluster their node IP is unreachable.
                    direct.append(f"http://{host if loopback else target['ip']}:{target['port']}{prefix}")
    return {"proxy": proxy, "direct": sorted(direct)}

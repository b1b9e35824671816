"""The end of the lineage: ``<family>/champion`` (the MLflow alias, behind a promotion gate) and
``<family>/endpoint`` (a Ray Serve application deployed once, hot-reloaded after). One of each per family."""

import json
import urllib.request
from typing import Any

import dagster as dg
from pydantic import Field

from ocm_assets.families import Family
from ocm_assets.training import model_key
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.registry import DataRegistry
from ocm_resources.serve_control import ServeControl

ALIAS = "champion"


def champion_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "champion"])


def endpoint_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "endpoint"])


class PromotionConfig(dg.Config):
    metric: str = Field(default="val_accuracy", description="Run metric compared between challenger and champion.")
    mode: str = Field(default="max", description="max (accuracy-like) or min (loss-like).")
    floor: float = Field(default=0.5, description="Absolute floor the challenger must clear.")
    margin: float = Field(default=0.01, description="How much the challenger must beat the champion by (absolute).")


def _metric(client, version, metric: str) -> float | None:
    if version is None or not version.run_id:
        return None
    return client.get_run(version.run_id).data.metrics.get(metric)


def build_champion_asset(fam: Family) -> dg.AssetsDefinition:
    key = champion_key(fam)

    @dg.asset(
        key=key,
        group_name=fam.name,
        deps=[model_key(fam)],
        check_specs=[dg.AssetCheckSpec(
            "promoted", asset=key, blocking=True,
            description="Passes when the newest registered version became champion; fails (blocking the "
            "endpoint) when it did not clear the gate.")],
        description="The MLflow alias `champion`: the newest registered version replaces the champion only if "
        "it clears the floor and beats it by the margin.",
        kinds={"mlflow"},
        tags={"ocm/family": fam.name},
    )
    def champion(context: dg.AssetExecutionContext, config: PromotionConfig, mlflow: MlflowTracking):
        from ocm_ml.promotion import decide_promotion

        if config.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {config.mode!r}")
        client = mlflow.configure()
        name = mlflow.model_name(fam.dataset)
        challenger = mlflow.latest_version(fam.dataset)
        if challenger is None:
            raise dg.Failure(f"no version of {name} is registered yet: materialize {model_key(fam).to_user_string()} first")
        current = mlflow.get_alias(fam.dataset, ALIAS)
        decision = decide_promotion(
            _metric(client, challenger, config.metric), _metric(client, current, config.metric),
            floor=config.floor, margin=config.margin, mode=config.mode, metric=config.metric,
            same_version=current is not None and current.version == challenger.version,
        )
        if decision.promote:
            mlflow.set_alias(fam.dataset, ALIAS, challenger.version)
        winner = challenger if decision.promote else current
        for reason in decision.reasons:
            context.log.info(f"{'PROMOTED' if decision.promote else 'kept'} v{challenger.version}: {reason}")
        metadata = {
            "decision": "promoted" if decision.promote else "kept",
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "challenger_version": int(challenger.version),
            "challenger_metric": decision.challenger if decision.challenger is not None else float("nan"),
            "champion_before": int(current.version) if current else 0,
            "champion_metric_before": decision.champion if decision.champion is not None else float("nan"),
            "champion_version": int(winner.version) if winner else 0,
            "champion_data_version": (winner.tags.get("data_version", "") if winner else ""),
            "model_uri": f"models:/{name}/{winner.version}" if winner else "",
            "metric": config.metric,
            "floor": config.floor,
            "margin": config.margin,
        }
        yield dg.Output(
            {"model_uri": metadata["model_uri"], "version": metadata["champion_version"], "name": name},
            data_version=dg.DataVersion(metadata["model_uri"] or "none"),
            metadata=metadata,
        )
        yield dg.AssetCheckResult(
            check_name="promoted", asset_key=key, passed=decision.promote,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(decision.reasons),
        )

    return champion


class EndpointConfig(dg.Config):
    num_replicas: int = Field(default=1, description="Serve replicas (ignored with autoscaling).")
    autoscaling_min_replicas: int | None = Field(default=None, description="Enable autoscaling: minimum replicas.")
    autoscaling_max_replicas: int | None = Field(default=None, description="Autoscaling: maximum replicas.")
    max_ongoing_requests: int = Field(default=64, description="Requests a replica holds at once (bounds a batch).")
    replica_cpus: float = Field(
        default=0.5, description="Logical CPUs reserved per replica (Ray scheduling; training shares the cluster)."
    )
    max_batch_size: int = Field(default=32, description="Dynamic batching: largest model batch.")
    batch_wait_timeout_s: float = Field(default=0.0, description="Dynamic batching: wait for more requests.")
    max_batch: int = Field(default=1000, description="Largest batch one request may send (else 4xx).")
    known_answer_rows: int = Field(default=8, description="Validation rows the known-answer check sends.")
    rollout: str = Field(
        default="replace",
        description="How a new champion reaches a live endpoint: replace (hot reload at once), canary (traffic "
        "share steps up while error rate and p99 hold, automatic rollback otherwise) or shadow (copies of the "
        "traffic go to it for a while, answers recorded, never returned; then the switch or a rollback).",
    )
    canary_steps: list[float] = Field(default=[0.05, 0.25, 0.5, 1.0], description="Canary traffic shares, rising to 1.0.")
    canary_step_seconds: float = Field(default=10.0, description="Least time per canary step.")
    canary_min_requests: int = Field(default=20, description="Challenger requests a step needs before it is judged.")
    canary_max_error_rate: float = Field(default=0.01, description="Challenger error rate above which it rolls back.")
    canary_max_p99_ms: float = Field(default=250.0, description="Challenger p99 latency (ms) above which it rolls back.")
    shadow_seconds: float = Field(default=10.0, description="Shadow window length.")
    shadow_min_agreement: float = Field(default=0.0, description="Least agreement with the champion in shadow (0 = record only).")
    rollout_timeout_seconds: float = Field(default=120.0, description="Longest a step waits for enough traffic.")
    rollout_probe: bool = Field(
        default=True, description="Send validation rows as probe traffic during canary/shadow, so a rollout "
        "is judged even when no client calls the endpoint.")

    def rollout_policy(self):
        from ocm_ml.serve.rollout import RolloutPolicy

        return RolloutPolicy(
            strategy=self.rollout, steps=tuple(self.canary_steps), step_seconds=self.canary_step_seconds,
            step_timeout_seconds=max(self.rollout_timeout_seconds, self.canary_step_seconds,
                                     self.shadow_seconds),
            min_requests=self.canary_min_requests, max_error_rate=self.canary_max_error_rate,
            max_p99_ms=self.canary_max_p99_ms, shadow_seconds=self.shadow_seconds,
            min_shadow_items=self.canary_min_requests, min_shadow_agreement=self.shadow_min_agreement,
        )


def _http_json(url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _known_answer(fam: Family, registry: DataRegistry, user_config: dict, url: str, rows: int):
    """Predict validation rows of the champion's data version offline (the registered model, loaded
    in this process) and over HTTP; the class/label per row must agree."""

    from ocm_ml.serve.loading import ServeConfig, load_bundle

    bundle = load_bundle(ServeConfig.from_user_config({**user_config, "warmup": False}))
    tag = bundle.describe().get("data_version")
    table = _validation_table(registry, tag, rows)
    if fam.kind == "image":
        import numpy as np

        pixels = np.asarray(table.column("image").to_pylist(), dtype=np.float32)
        offline, _ = bundle.predict(pixels)
        offline = [int(c) for c in offline]
        status, answer = _http_json(f"{url}/predict", {"images": pixels.astype(int).tolist()})
        served = [p["class_id"] for p in answer["predictions"]] if status == 200 else None
    else:
        texts = table.column("text").to_pylist()
        offline, _ = bundle.predict(texts)
        status, answer = _http_json(f"{url}/predict", {"texts": texts})
        served = [p["label"] for p in answer["predictions"]] if status == 200 else None
    return status, offline, served, tag


def _served_model_uri(serve: ServeControl, name: str) -> str | None:
    """The model URI the running application answers with, or None when it is not deployed/answering."""
    app = serve.application(name)
    if app is None or "RUNNING" not in app["status"]:
        return None
    status, health = _http_json(f"{serve.url(name)}/health")
    return health.get("model_uri") if status == 200 and isinstance(health, dict) else None


def _validation_table(registry: DataRegistry, tag: str | None, rows: int):
    """The first ``rows`` validation rows of data version ``tag`` (a pyarrow table)."""
    import pyarrow.parquet as pq

    version = registry.resolve(tag)
    with registry.open(version, f"{version.dataset}/val.parquet") as fh:
        return pq.ParquetFile(fh).read_row_group(0).slice(0, rows)


def _validation_rows(fam: Family, registry: DataRegistry, tag: str | None, rows: int) -> dict:
    """A /predict body of ``rows`` validation rows of data version ``tag`` (probe traffic)."""
    table = _validation_table(registry, tag, rows)
    if fam.kind == "image":
        return {"images": [list(map(int, row)) for row in table.column("image").to_pylist()]}
    return {"texts": table.column("text").to_pylist()}


def _progressive_rollout(context, fam: Family, config: EndpointConfig, serve: ServeControl, mlflow: MlflowTracking,
                         registry: DataRegistry, user_config: dict, served_uri: str, deploy) -> dict:
    """Canary or shadow of the new champion next to the served one; switch on success, else roll back the
    endpoint and the MLflow alias and fail the step (the endpoint keeps serving ``served_uri``)."""
    from ocm_ml.serve.rollout import run_canary, run_shadow, sum_replica_stats

    policy = config.rollout_policy()
    new_uri = user_config["model_uri"]
    staged = {**user_config, "model_uri": served_uri, "challenger_uri": new_uri,
              "challenger_mode": "shadow" if policy.strategy == "shadow" else "canary", "challenger_share": 0.0}
    outcome = deploy(staged)
    replica_urls = outcome["urls"].get("direct") or [serve.url(fam.name)]

    def read_stats() -> dict:
        per_replica = []
        for url in replica_urls:
            status, info = _http_json(f"{url}/info")
            if status == 200 and isinstance(info, dict):
                per_replica.append((info.get("serving") or {}).get("challenger") or {})
        return sum_replica_stats(per_replica)

    send_probe = None
    if config.rollout_probe:
        from ocm_ml.serve.loading import resolve_model

        tag = resolve_model(new_uri, mlflow.configure()).run_tags.get("dvc_data_version")
        body = _validation_rows(fam, registry, tag, 1)
        proxy = serve.url(fam.name)

        def send_probe() -> None:
            _http_json(f"{proxy}/predict", body, timeout=10.0)

    log = context.log.info
    if policy.strategy == "canary":
        result = run_canary(policy, lambda share: deploy({**staged, "challenger_share": share}), read_stats,
                            send_probe, log)
    else:
        result = run_shadow(policy, read_stats, send_probe, log)
    record = {"strategy": policy.strategy, "from": served_uri, "to": new_uri, "passed": result.passed,
              "reasons": result.reasons, "steps": result.steps}
    if result.passed:
        for reason in result.reasons:
            log(reason)
        return {**deploy(user_config), "rollout": record}

    # Roll back: the served model stays (no challenger), and the alias points at it again.
    deploy({**user_config, "model_uri": served_uri})
    restored = _restore_alias(mlflow, fam, served_uri)
    reasons = "; ".join(result.reasons)
    context.log.error(f"{policy.strategy} of {new_uri} failed, rolled back to {served_uri}: {reasons}")
    raise dg.Failure(
        description=f"{policy.strategy} rollout of {new_uri} rolled back; {fam.name} still serves {served_uri}"
        f"{f' (alias {ALIAS} -> v{restored})' if restored else ''}: {reasons}",
        metadata={"rollout": dg.MetadataValue.json(record), "served_model_uri": served_uri},
    )


def _restore_alias(mlflow: MlflowTracking, fam: Family, served_uri: str) -> str | None:
    """Point the champion alias back at the served version (``models:/<name>/<version>``)."""
    prefix = f"models:/{mlflow.model_name(fam.dataset)}/"
    if not served_uri.startswith(prefix) or not served_uri[len(prefix):].isdigit():
        return None
    version = served_uri[len(prefix):]
    mlflow.set_alias(fam.dataset, ALIAS, version)
    return version


def build_endpoint_asset(fam: Family) -> dg.AssetsDefinition:
    key = endpoint_key(fam)

    @dg.asset(
        key=key,
        group_name=fam.name,
        ins={"champion": dg.AssetIn(champion_key(fam))},
        check_specs=[
            dg.AssetCheckSpec("health", asset=key, description="GET /health answers healthy with the champion's URI"),
            dg.AssetCheckSpec("known_answer", asset=key,
                              description="POST /predict on validation rows equals the registered model offline"),
        ],
        description=f"Ray Serve application `/{fam.name}` (FastAPI ingress, dynamic batching) serving the "
        "champion; deployed once, then hot-reloaded through `reconfigure`.",
        kinds={"ray", "fastapi"},
        tags={"ocm/family": fam.name},
    )
    def endpoint(
        context: dg.AssetExecutionContext, config: EndpointConfig, mlflow: MlflowTracking,
        serve: ServeControl, registry: DataRegistry, champion: dict,
    ):
        if not champion.get("model_uri"):
            raise dg.Failure(f"{fam.name} has no champion yet: materialize {champion_key(fam).to_user_string()}")
        config.rollout_policy()  # a bad rollout setting fails here, before anything changes
        registry_url = getattr(registry, "repo_url", None)
        user_config = {
            "kind": fam.kind,
            "model_uri": champion["model_uri"],
            "tracking_uri": mlflow.resolved_tracking_uri(),
            "registry_uri": mlflow.resolved_registry_uri(),
            "registry_url": registry_url,
            "max_batch": config.max_batch,
            "max_batch_size": config.max_batch_size,
            "batch_wait_timeout_s": config.batch_wait_timeout_s,
            # explicit, so that a hot reload also ends any canary/shadow left in the live config
            "challenger_uri": None,
            "challenger_mode": "canary",
            "challenger_share": 0.0,
        }
        autoscaling = None
        if config.autoscaling_max_replicas:
            autoscaling = {"min_replicas": config.autoscaling_min_replicas or 1,
                           "max_replicas": config.autoscaling_max_replicas}

        def deploy(cfg: dict) -> dict:
            return serve.deploy_or_reconfigure(
                fam.name, fam.kind, cfg, num_replicas=config.num_replicas,
                max_ongoing_requests=config.max_ongoing_requests, autoscaling_config=autoscaling,
                ray_actor_options={"num_cpus": config.replica_cpus},
            )

        served_uri = _served_model_uri(serve, fam.name) if config.rollout != "replace" else None
        if served_uri is None or served_uri == champion["model_uri"]:
            outcome = {**deploy(user_config), "rollout": {"strategy": "replace"}}
        else:
            outcome = _progressive_rollout(context, fam, config, serve, mlflow, registry, user_config,
                                           served_uri, deploy)
        url = serve.url(fam.name)
        context.log.info(f"{outcome['action']} {url} -> {champion['model_uri']}")
        health_status, health = _http_json(f"{url}/health")
        info_status, info = _http_json(f"{url}/info")
        ka_status, offline, served, tag = _known_answer(fam, registry, user_config, url, config.known_answer_rows)
        yield dg.Output(
            {"url": url, "model_uri": champion["model_uri"]},
            data_version=dg.DataVersion(champion["model_uri"]),
            metadata={
                "url": dg.MetadataValue.url(url),
                "action": outcome["action"],
                "model_uri": champion["model_uri"],
                "data_version": tag or "",
                "info": dg.MetadataValue.json(info if info_status == 200 else {"status": info_status}),
                "direct_ingress": dg.MetadataValue.json(outcome["urls"].get("direct", [])),
                "rollout": dg.MetadataValue.json(outcome["rollout"]),
            },
        )
        yield dg.AssetCheckResult(
            check_name="health", asset_key=key,
            passed=health_status == 200 and isinstance(health, dict) and health.get("model_uri") == champion["model_uri"],
            metadata={"status_code": health_status, "body": dg.MetadataValue.json(health if isinstance(health, dict) else {"text": str(health)})},
        )
        yield dg.AssetCheckResult(
            check_name="known_answer", asset_key=key, passed=served is not None and served == offline,
            metadata={"status_code": ka_status, "offline": dg.MetadataValue.json(offline),
                      "served": dg.MetadataValue.json(served or [])},
        )

    return endpoint


def build_serving_assets(fam: Family) -> list[dg.AssetsDefinition]:
    return [build_champion_asset(fam), build_endpoint_asset(fam)]


def rollout_job(fam: Family):
    return dg.define_asset_job(
        f"{fam.name}_rollout",
        selection=dg.AssetSelection.assets(champion_key(fam), endpoint_key(fam)),
        description=f"Promote the newest {fam.name} model if it beats the champion, then roll the endpoint over.",
        tags={"ocm/family": fam.name},
    )

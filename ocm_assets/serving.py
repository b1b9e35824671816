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
    import pyarrow.parquet as pq

    from ocm_ml.serve.loading import ServeConfig, load_bundle

    bundle = load_bundle(ServeConfig.from_user_config({**user_config, "warmup": False}))
    tag = bundle.describe().get("data_version")
    version = registry.resolve(tag)
    with registry.open(version, f"{version.dataset}/val.parquet") as fh:
        table = pq.ParquetFile(fh).read_row_group(0).slice(0, rows)
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
        }
        autoscaling = None
        if config.autoscaling_max_replicas:
            autoscaling = {"min_replicas": config.autoscaling_min_replicas or 1,
                           "max_replicas": config.autoscaling_max_replicas}
        outcome = serve.deploy_or_reconfigure(
            fam.name, fam.kind, user_config, num_replicas=config.num_replicas,
            max_ongoing_requests=config.max_ongoing_requests, autoscaling_config=autoscaling,
            ray_actor_options={"num_cpus": config.replica_cpus},
        )
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

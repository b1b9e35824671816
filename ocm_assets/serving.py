"""The end of the lineage: ``<family>/champion`` (the promotion gate on the evaluation) and
``<family>/endpoint`` (a Ray Serve application deployed once, hot-reloaded after). One of each per family.

Aliases move in two steps, so that an alias never names a model nobody serves: the gate sets ``challenger``
on the version it lets through; the endpoint serves that version, checks it, and only then moves ``champion``
to it and drops ``challenger``. Any failure after the gate (a bad endpoint setting, a failed deploy or reload,
a failed health or known-answer check, a canary rollback, the run being terminated) restores the endpoint
to the champion it served, drops ``challenger`` and fails the run saying so.

Rollouts of one family run one at a time: the rollout job carries the run tag ``ocm/rollout=<family>``, which
the instance's run queue limits to one run per value (``ocm_resources.env.LOCAL_INSTANCE_YAML``, the Helm
values). Each rollout judges the challenger its own partition registered.
"""

from typing import Any, cast

import dagster as dg
from pydantic import Field

from ocm_assets.evaluation import CHAMPION, build_evaluation_asset, evaluation_key
from ocm_assets.families import Family
from ocm_resources.env import ROLLOUT_TAG
from ocm_resources.mlflow import MlflowTracking
from ocm_resources.prediction_logs import PredictionLogStore
from ocm_resources.registry import DataRegistry, RegistryVersion
from ocm_resources.serve_control import ServeControl, ServeError

ALIAS = CHAMPION
CHALLENGER = "challenger"


def champion_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "champion"])


def endpoint_key(fam: Family) -> dg.AssetKey:
    return dg.AssetKey([fam.name, "endpoint"])


class ChampionConfig(dg.Config):
    """Overrides of the family's gate (``ocm_assets.families``); unset fields keep its defaults."""

    floors: dict[str, float] | None = Field(
        default=None, description='Least holdout figures, e.g. {"accuracy": 0.85, "macro_f1": 0.8}.')
    baseline_margins: dict[str, float] | None = Field(
        default=None,
        description='How far above the majority-class predictor on the holdout, e.g. {"accuracy": 0.1}.')
    win_metric: str | None = Field(
        default=None, description="Holdout metric the challenger must beat the champion on.")
    win_margin: float | None = Field(
        default=None, description="By how much (absolute), e.g. 0.01 = one point.")

    def gate(self, default):
        from dataclasses import replace

        overrides = {k: v for k, v in self.model_dump().items() if v is not None}
        return replace(default, **overrides)


def rollout_partition(context: dg.AssetExecutionContext, fam: Family | None = None) -> str:
    """The data version this rollout judges: the run's partition, else its ``ocm/registry_tag`` tag (a run of
    the champion and endpoint alone, launched from the UI with that tag), else (a run its automation
    condition asked for) the partition of the newest evaluation."""
    if context.has_partition_key:
        return context.partition_key
    tag = context.run.tags.get("dagster/partition") or context.run.tags.get("ocm/registry_tag")
    if not tag and fam is not None:
        records = context.instance.fetch_materializations(evaluation_key(fam), limit=1).records
        tag = records[0].partition_key if records else None
    if not tag:
        raise dg.Failure(
            "the rollout judges one data version's challenger: launch it for a partition (the registry tag), "
            "e.g. `dagster job launch -j <family>_rollout --partition <tag>`, as the rollout sensor does")
    return tag


def latest_evaluation(instance: dg.DagsterInstance, fam: Family, partition: str) -> dict[str, Any]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=evaluation_key(fam), asset_partitions=[partition]), limit=1).records
    mat = records[0].asset_materialization if records else None
    if mat is None or "evaluation" not in mat.metadata:
        raise dg.Failure(f"{partition} has no evaluation: materialize {evaluation_key(fam).to_user_string()} "
                         "for it (the rollout job does)")
    # the evaluation asset writes this entry as MetadataValue.json of a dict
    return cast("dict[str, Any]", mat.metadata["evaluation"].value)


def _holdout_figures(record: dict[str, Any], role: str) -> dict[str, float] | None:
    scores = record["scores"].get(role)
    return None if scores is None else {m: scores["holdout"][m] for m in ("accuracy", "macro_f1")}


def build_champion_asset(fam: Family) -> dg.AssetsDefinition:
    key = champion_key(fam)

    @dg.asset(
        key=key,
        group_name=fam.name,
        deps=[evaluation_key(fam)],
        check_specs=[dg.AssetCheckSpec(
            "promoted", asset=key,
            description="Passes when this rollout's challenger cleared the gate (alias `challenger` set); "
            "warns when the champion is kept (the endpoint then keeps, or restores, serving the champion).")],
        description="The promotion gate on the evaluation (same holdout rows for challenger and champion): "
        "floors, baselines and a win margin. A challenger that clears it gets the MLflow alias `challenger`; "
        "`champion` moves once the endpoint serves it.",
        kinds={"mlflow"},
        tags={"ocm/family": fam.name},
    )
    def champion(context: dg.AssetExecutionContext, config: ChampionConfig, mlflow: MlflowTracking):
        from ocm_ml.promotion import decide

        gate = config.gate(fam.gate)
        partition = rollout_partition(context, fam)
        record = latest_evaluation(context.instance, fam, partition)
        current = mlflow.get_alias(fam.dataset, ALIAS)
        current_version = int(current.version) if current is not None else None
        if current_version != record["champion_version"]:
            raise dg.Failure(
                f"the evaluation of {partition} scored champion v{record['champion_version']}, but the "
                f"champion is now v{current_version}: materialize the evaluation again (rollouts of one "
                f"family must run one at a time: run tag {ROLLOUT_TAG})")
        challenger = record["challenger_version"]
        decision = decide(
            _holdout_figures(record, "challenger"), _holdout_figures(record, "champion"), gate,
            baselines={name: figures["holdout"] for name, figures in record["baselines"].items()},
            same_version=current_version == challenger,
        )
        name = mlflow.model_name(fam.dataset)
        if decision.promote:
            mlflow.set_alias(fam.dataset, CHALLENGER, challenger)
        serve_version = challenger if decision.promote else current_version
        for reason in decision.reasons:
            context.log.info(f"{'PASSED' if decision.promote else 'kept the champion'} v{challenger}: "
                             f"{reason}")
        value = {
            "decision": "promoted" if decision.promote else "kept",
            "partition": partition,
            "name": name,
            "challenger_version": challenger,
            "champion_version": current_version,
            "champion_uri": f"models:/{name}/{current_version}" if current_version else None,
            "version": serve_version,
            "model_uri": f"models:/{name}/{serve_version}" if serve_version else "",
        }
        yield dg.Output(value,
                        data_version=dg.DataVersion(f"{value['decision']}:{value['model_uri'] or 'none'}"),
                        metadata={
            "decision": value["decision"],
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "gate_checks": dg.MetadataValue.json(decision.checks),
            "gate": dg.MetadataValue.json({"floors": dict(gate.floors),
                                           "baseline_margins": dict(gate.baseline_margins),
                                           "win_metric": gate.win_metric, "win_margin": gate.win_margin}),
            "partition": partition,
            "challenger_version": challenger,
            "champion_before": current_version or 0,
            # JsonMetadataValue takes None; only the MetadataValue.json shortcut is annotated narrower
            "challenger_holdout": dg.MetadataValue.json(
                _holdout_figures(record, "challenger")),  # pyright: ignore[reportArgumentType]
            "champion_holdout": dg.MetadataValue.json(_holdout_figures(record, "champion") or {}),
            "to_serve": value["model_uri"],
            "mlflow_evaluation_run_id": record.get("mlflow_run_id", ""),
        })
        yield dg.AssetCheckResult(
            check_name="promoted", asset_key=key, passed=decision.promote,
            severity=dg.AssetCheckSeverity.WARN, description="; ".join(decision.reasons),
        )

    return champion


class EndpointConfig(dg.Config):
    num_replicas: int = Field(default=1, description="Serve replicas (ignored with autoscaling).")
    autoscaling_min_replicas: int | None = Field(
        default=None, description="Enable autoscaling: minimum replicas.")
    autoscaling_max_replicas: int | None = Field(default=None, description="Autoscaling: maximum replicas.")
    max_ongoing_requests: int = Field(
        default=64, description="Requests a replica holds at once (bounds a batch).")
    replica_cpus: float = Field(
        default=0.5,
        description="Logical CPUs reserved per replica (Ray scheduling; training shares the cluster)."
    )
    max_batch_size: int = Field(default=32, description="Dynamic batching: largest model batch.")
    batch_wait_timeout_s: float = Field(default=0.0, description="Dynamic batching: wait for more requests.")
    max_batch: int = Field(default=1000, description="Largest batch one request may send (else 4xx).")
    known_answer_rows: int = Field(
        default=8, description="Validation rows the known-answer check sends (>= 1).")
    rollout: str = Field(
        default="replace",
        description="How a new champion reaches a live endpoint: replace (hot reload at once), canary "
        "(traffic share steps up while error rate and p99 hold, automatic rollback otherwise) or shadow "
        "(copies of the traffic go to it for a while, answers recorded, never returned; then the switch or a "
        "rollback).",
    )
    canary_steps: list[float] = Field(
        default=[0.05, 0.25, 0.5, 1.0], description="Canary traffic shares, rising to 1.0.")
    canary_step_seconds: float = Field(default=10.0, description="Least time per canary step.")
    canary_min_requests: int = Field(
        default=20, description="Challenger requests a step needs before it is judged.")
    canary_max_error_rate: float = Field(
        default=0.01, description="Challenger error rate above which it rolls back.")
    canary_max_p99_ms: float = Field(
        default=250.0, description="Challenger p99 latency (ms) above which it rolls back.")
    shadow_seconds: float = Field(default=10.0, description="Shadow window length.")
    shadow_min_agreement: float = Field(
        default=0.0, description="Least agreement with the champion in shadow (0 = record only).")
    rollout_timeout_seconds: float = Field(
        default=120.0, description="Longest a step waits for enough traffic.")
    rollout_probe: bool = Field(
        default=True, description="Send validation rows as probe traffic during canary/shadow, so a rollout "
        "is judged even when no client calls the endpoint.")

    # an instance method shadowing pydantic's deprecated classmethod BaseModel.validate (pydantic v1 API)
    def validate(self) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Refuse a bad setting before anything changes."""
        if self.known_answer_rows < 1:
            raise ValueError(f"known_answer_rows must be >= 1, got {self.known_answer_rows}")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.replica_cpus <= 0:
            raise ValueError(f"replica_cpus must be > 0, got {self.replica_cpus}")
        self.rollout_policy()

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


class RolloutError(RuntimeError):
    """A step of the rollout failed; the endpoint is restored to the served champion."""


def _user_config(fam: Family, config: EndpointConfig, mlflow: MlflowTracking, registry: DataRegistry,
                 model_uri: str) -> dict[str, Any]:
    return {
        "kind": fam.kind,
        "model_uri": model_uri,
        "tracking_uri": mlflow.resolved_tracking_uri(),
        "registry_uri": mlflow.resolved_registry_uri(),
        "registry_url": getattr(registry, "repo_url", None),
        "max_batch": config.max_batch,
        "max_batch_size": config.max_batch_size,
        "batch_wait_timeout_s": config.batch_wait_timeout_s,
        # explicit, so that a hot reload also ends any canary/shadow left in the live config
        "challenger_uri": None,
        "challenger_mode": "canary",
        "challenger_share": 0.0,
    }


class _Endpoint:
    """One family's endpoint in one run: the application the core builds for a user_config (replicas, CPUs,
    autoscaling and the code version of this run), handed to :class:`ServeControl`."""

    def __init__(self, fam: Family, config: EndpointConfig, serve: ServeControl, registry: DataRegistry,
                 mlflow: MlflowTracking, user_config: dict[str, Any]):
        from ocm_resources.mlflow import git_code_version

        self.fam, self.config, self.serve, self.registry, self.user_config = (
            fam, config, serve, registry, user_config)
        self.code_version = getattr(mlflow, "code_version", None) or git_code_version()

    def run(self, user_config: dict[str, Any]) -> dict[str, Any]:
        from ocm_ml.serve.deployments import build_app, config_hash

        c = self.config
        autoscaling = ({"min_replicas": c.autoscaling_min_replicas or 1,
                        "max_replicas": c.autoscaling_max_replicas}
                       if c.autoscaling_max_replicas else None)
        app = build_app(self.fam.kind, user_config, num_replicas=c.num_replicas,
                        autoscaling_config=autoscaling, max_ongoing_requests=c.max_ongoing_requests,
                        ray_actor_options={"num_cpus": c.replica_cpus}, version=self.code_version)
        return self.serve.run(self.fam.name, app, config_hash(user_config))

    def validation(self, rows: int):
        """The registered model loaded here, its lineage, and ``rows`` rows of its own data version's
        validation split (at its commit) as a /predict body."""
        from ocm_ml.contract import TAG_RE
        from ocm_ml.serve.loading import ServeConfig, load_bundle
        from ocm_ml.serve.rollout import request_body

        bundle = load_bundle(ServeConfig.from_user_config({**self.user_config, "warmup": False}))
        info = bundle.describe()
        match = TAG_RE.match(info["data_version"])
        if not match:
            raise RolloutError(f"the served model's data version {info['data_version']!r} is not a "
                               "registry tag")
        version = RegistryVersion(match["dataset"], match["version"], info["data_version"],
                                  info["dvc_commit"])
        with self.registry.open(version, f"{version.dataset}/val.parquet") as fh:
            return bundle, info, request_body(self.fam.kind, fh, rows)

    def verify(self) -> dict[str, Any]:
        """/health names the model and /predict agrees with it offline; raises :class:`RolloutError`
        otherwise."""
        from ocm_ml.serve.rollout import offline_answers, served_answers

        uri, name, rows = self.user_config["model_uri"], self.fam.name, self.config.known_answer_rows
        code, health = self.serve.health(name)
        if not (code == 200 and isinstance(health, dict) and health.get("model_uri") == uri):
            raise RolloutError(f"{self.serve.url(name)}/health does not report {uri} as healthy "
                               f"(HTTP {code}: {str(health)[:300]})")
        bundle, info, body = self.validation(rows)
        offline = offline_answers(self.fam.kind, bundle, body)
        code, answer = self.serve.predict(name, body)
        served = served_answers(self.fam.kind, answer) if code == 200 else None
        if served != offline:
            raise RolloutError(f"{self.serve.url(name)}/predict on {rows} validation rows of "
                               f"{info['data_version']} does not agree with the registered model offline "
                               f"(HTTP {code}; served {served}, offline {offline})")
        return {"health": health, "known_answer": {"status_code": code, "offline": offline, "served": served},
                "data_version": info["data_version"]}

    def progressive(self, log, served_uri: str) -> dict[str, Any]:
        """Canary or shadow of the new model beside the served one; returns the outcome when it passed (the
        new model then serves all traffic), raises :class:`RolloutError` otherwise (the caller restores)."""
        from ocm_ml.serve.rollout import run_canary, run_shadow, sum_replica_stats

        policy, new_uri = self.config.rollout_policy(), self.user_config["model_uri"]
        staged = {**self.user_config, "model_uri": served_uri, "challenger_uri": new_uri,
                  "challenger_share": 0.0,
                  "challenger_mode": "shadow" if policy.strategy == "shadow" else "canary"}
        replica_urls = self.run(staged)["urls"].get("direct") or [self.serve.url(self.fam.name)]

        def read_stats() -> dict:
            try:
                return sum_replica_stats(self.serve.replica_stats(replica_urls))
            except ServeError as exc:
                raise RolloutError(str(exc)) from None

        probe = self.serve.probe(self.fam.name, self.validation(1)[2]) if self.config.rollout_probe else None
        if policy.strategy == "canary":
            def set_share(share: float) -> None:
                self.run({**staged, "challenger_share": share})

            result = run_canary(policy, set_share, read_stats, probe, log)
        else:
            result = run_shadow(policy, read_stats, probe, log)
        if not result.passed:
            raise RolloutError(f"{policy.strategy} of {new_uri} failed: {'; '.join(result.reasons)}")
        for reason in result.reasons:
            log(reason)
        return {**self.run(self.user_config), "rollout": {
            "strategy": policy.strategy, "from": served_uri, "to": new_uri, "passed": result.passed,
            "reasons": result.reasons, "steps": result.steps}}

    def restore(self, champion: dict, log) -> str:
        """Put the endpoint back on the champion it served (or take down a first deployment that never served
        a champion); returns what was done, for the failure message."""
        previous, name = champion["champion_uri"], self.fam.name
        try:
            if previous is None:
                self.serve.delete(name)
                done = f"{name} had no champion, so its endpoint was removed; alias {ALIAS} is unset"
            else:
                self.run({**self.user_config, "model_uri": previous})
                if self.serve.served_model_uri(name) != previous:
                    raise RolloutError(f"{previous} does not answer /health after the rollback")
                done = f"{name} serves the champion {previous} again; alias {ALIAS} unchanged"
        except Exception as exc:
            done = (f"the rollback failed too ({exc}): {name}'s endpoint may not serve the champion "
                    f"{previous}; re-run the rollout for {champion['partition']} to redeploy it")
        log(done)
        return done


def build_endpoint_asset(fam: Family) -> dg.AssetsDefinition:
    key = endpoint_key(fam)

    @dg.asset(
        key=key,
        group_name=fam.name,
        ins={"champion": dg.AssetIn(champion_key(fam))},
        check_specs=[
            dg.AssetCheckSpec("health", asset=key,
                              description="GET /health answers healthy with the served model's URI"),
            dg.AssetCheckSpec("known_answer", asset=key,
                              description="POST /predict on validation rows equals the registered model "
                              "offline"),
        ],
        description=f"Ray Serve application `/{fam.name}` (FastAPI ingress, dynamic batching): serves the "
        "gate's challenger once it passes its checks (then alias `champion` moves to it), else keeps or "
        "restores the champion; deployed once, then hot-reloaded (new replica settings and code versions "
        "applied too).",
        kinds={"ray", "fastapi"},
        tags={"ocm/family": fam.name},
    )
    def endpoint(
        context: dg.AssetExecutionContext, config: EndpointConfig, mlflow: MlflowTracking,
        serve: ServeControl, registry: DataRegistry, champion: dict, prediction_logs: PredictionLogStore,
    ):
        from ocm_ml.serve.loading import ServeConfig

        promoted, target = champion["decision"] == "promoted", champion["model_uri"]
        try:
            if not target:
                raise RolloutError(f"{fam.name} has no champion and the challenger "
                                   f"v{champion['challenger_version']} did not clear the gate: nothing to "
                                   "serve")
            config.validate()
            user_config = _user_config(fam, config, mlflow, registry, target)
            user_config["prediction_log"] = prediction_logs.replica_settings(fam.name)  # docs/monitoring.md
            ServeConfig.from_user_config(user_config)
        except (ValueError, RolloutError) as exc:
            if promoted:
                mlflow.delete_alias(fam.dataset, CHALLENGER)
            raise dg.Failure(f"{exc}; nothing was changed: {fam.name} stays on "
                             f"{champion['champion_uri'] or 'no model'}") from None
        live = _Endpoint(fam, config, serve, registry, mlflow, user_config)
        served_uri = serve.served_model_uri(fam.name)
        try:
            if promoted and served_uri and config.rollout != "replace":
                outcome = live.progressive(context.log.info, served_uri)
            else:  # also when the champion is kept: replica settings or code may have changed
                kept = not promoted and served_uri == target
                outcome = {**live.run(user_config), **({"action": "kept"} if kept else {}),
                           "rollout": {"strategy": "none" if kept else "replace"}}
            checked = live.verify()
        except BaseException as exc:  # also a run termination (DagsterExecutionInterruptedError)
            if promoted:
                mlflow.delete_alias(fam.dataset, CHALLENGER)
            restored = live.restore(champion, context.log.error)
            if not isinstance(exc, Exception):
                raise
            raise dg.Failure(
                description=f"{'rollout of' if promoted else 'redeploy of'} {target} failed: {exc}. "
                f"{restored}",
                metadata={"served_model_uri": champion["champion_uri"] or ""}) from None
        if promoted:
            mlflow.set_alias(fam.dataset, ALIAS, champion["version"])
            mlflow.delete_alias(fam.dataset, CHALLENGER)
            context.log.info(f"alias {ALIAS} -> v{champion['version']} (served and checked)")
        url = serve.url(fam.name)
        context.log.info(f"{outcome['action']} {url} -> {target}")
        info_status, info = serve.info(fam.name)
        yield dg.Output({"url": url, "model_uri": target}, data_version=dg.DataVersion(target), metadata={
            "url": dg.MetadataValue.url(url), "action": outcome["action"], "model_uri": target,
            "champion_version": champion["version"], "data_version": checked["data_version"],
            "info": dg.MetadataValue.json(info if info_status == 200 else {"status": info_status}),
            "direct_ingress": dg.MetadataValue.json(outcome["urls"].get("direct", [])),
            # Serve's Prometheus metrics
            "metrics_url": dg.MetadataValue.url(prediction_logs.metrics_url or ""),
            "rollout": dg.MetadataValue.json(outcome["rollout"]),
        })
        yield dg.AssetCheckResult(check_name="health", asset_key=key, passed=True,
                                  metadata={"body": dg.MetadataValue.json(checked["health"])})
        ka = checked["known_answer"]
        yield dg.AssetCheckResult(check_name="known_answer", asset_key=key, passed=True, metadata={
            "status_code": ka["status_code"], "offline": dg.MetadataValue.json(ka["offline"]),
            "served": dg.MetadataValue.json(ka["served"])})

    return endpoint


def build_serving_assets(fam: Family) -> list[dg.AssetsDefinition]:
    return [build_evaluation_asset(fam), build_champion_asset(fam), build_endpoint_asset(fam)]


def rollout_job(fam: Family):
    return dg.define_asset_job(
        f"{fam.name}_rollout",
        selection=dg.AssetSelection.assets(evaluation_key(fam), champion_key(fam), endpoint_key(fam)),
        description=f"For one {fam.name} registry version (partition): evaluate its model against the "
        "champion on the same rows, gate it, and roll the endpoint over when it passes (else keep or "
        "restore the champion).",
        tags={"ocm/family": fam.name, ROLLOUT_TAG: fam.name},
    )

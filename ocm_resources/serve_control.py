"""Ray Serve control: deploy, update and watch the endpoint applications on a long-lived Ray cluster.

The ML core builds each application (``ocm_ml.serve.deployments.build_app``: the replica classes and their
FastAPI apps); this resource runs it on Serve, waits until every replica serves it, reports its URLs, health
and replica counters, sends probe traffic, and takes it down. It speaks Serve's public API
(``serve.run_many``, ``serve.status``, ``serve.delete``) and HTTP to the replicas; the one read Serve has no
public call for is :func:`_serve_details`.

A Serve application started on a Ray that the step process itself started dies with that process, so the
embedded default deploys to the local head that ``make dev``/``make demo`` run (``scripts/dev.sh``), and
refuses an in-process Ray with a clear message. On the cluster path the step reaches the head through Ray
Client (``ray://head:10001``).

    python -m ocm_resources.serve_control start-http --host 127.0.0.1 --port 8000   # on RAY_ADDRESS
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import dagster as dg
from pydantic import Field

#: Serve's states that end a deploy: nothing will change without a new deploy.
FAILED_STATES = ("DEPLOY_FAILED", "UNHEALTHY")


class ServeError(RuntimeError):
    """Serve could not do what was asked; the message says what to check."""


class ReloadError(ServeError):
    """An update did not take effect on every replica; the message has the replica's or Serve's reason."""


# The Ray Client address this process connected to (Ray reports only the head's GCS address then).
_client_address: dict[str, str | None] = {"address": None}


def http_json(url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, parsed body) of a GET (or a POST of ``body`` as JSON); an HTTP error's body is parsed when
    it is JSON, else text; status 0 with the reason when nothing answered (refused, timed out, reset)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text
    except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
        return 0, f"no answer from {url}: {getattr(exc, 'reason', exc)}"


def _serve_details(name: str | None = None) -> dict[str, Any]:
    """Serve's instance details (deployment configs, HTTP options, direct-ingress target groups) and, for
    application ``name``, each deployment's running code version (``code_version``).

    Ray 2.60 has no public call for either: ``serve.status()`` carries states and messages only, and the
    same ``ServeInstanceDetails`` is public only through the dashboard's REST API
    (``GET /api/serve/applications/``), which a Ray Client driver or a head without dashboard does not
    have. This is ocm's one use of Serve's private client."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # _get_global_client raises (it does not return None) when Serve is not running
    details = client.get_serve_details()
    if not any(group.get("app_name") for group in details.get("target_groups") or []):
        # Under HAProxy ingress (ocm's local default, docs/performance.md) HAProxy is the only target listed;
        # the replicas' own direct-ingress ports are the target groups the controller gives HAProxy.
        import ray

        groups = ray.get(client._controller.get_target_groups.remote(from_proxy_manager=True))
        details["target_groups"] = [group.model_dump(mode="json") for group in groups]
    app = (details.get("applications") or {}).get(name) if name else None
    for dep_name, dep in ((app or {}).get("deployments") or {}).items():
        dep["code_version"] = client.get_deployment_info(dep_name, name)[0].version
    return details


class ServeControl(dg.ConfigurableResource):
    """Runs ocm's Serve applications (one per family, route prefix ``/<family>``) on a long-lived cluster.

    Example::

        serve = ServeControl(address="auto", temp_dir=".ocm/ray")    # the local head of `make dev`
        user_config = {"kind": "image", "model_uri": ..., "tracking_uri": ..., "registry_url": ...}
        # build_app and config_hash: the core's (ocm_ml.serve.deployments), called by the endpoint asset
        serve.run("fashion_mnist", build_app("image", user_config, version=commit),
                  revision=config_hash(user_config))
        serve.health("fashion_mnist")["model_uri"]
    """

    address: str | None = Field(
        default="auto",
        description='Long-lived Ray cluster: "auto" = the local head recorded in temp_dir (make dev), '
        '"host:port" = that head, "ray://host:10001" = its Ray Client server (cluster path); None = the '
        "Ray this process is already connected to (tests).",
    )
    temp_dir: str | None = Field(default=None,
                                 description="Temp folder of the local head (`ray start --temp-dir`).")
    http_host: str = Field(default="127.0.0.1", description="Serve HTTP host.")
    http_port: int = Field(default=8000, description="Serve HTTP port.")
    reload_timeout_s: float = Field(default=300.0, description="Seconds a deploy or hot reload may take.")

    # --- connection -------------------------------------------------------------------------------------

    def connect(self) -> None:
        import ray

        if self.address is None:
            if not ray.is_initialized():
                raise ServeError("ServeControl(address=None) needs a Ray this process is already "
                                 "connected to")
            return
        address = self.address
        if address == "auto":
            from ocm_resources.ray import local_head_address

            address = local_head_address(self.temp_dir)
            if address is None:
                raise ServeError(
                    "no long-lived local Ray head is running (a Serve app on an in-process Ray would die "
                    "with the step): start one with `make dev` (or `scripts/dev.sh ray-up`), or set the Ray "
                    "address"
                )
        if ray.is_initialized():
            current = _connected_address()
            if current == address or (current and not address.startswith("ray://")
                                      and current.split(":")[-1] == address.split(":")[-1]):
                return
            raise ServeError(
                f"this process is connected to Ray at {current}, not to the long-lived cluster {address}; "
                "run the endpoint step in its own process (the default multiprocess executor does)"
            )
        from ocm_resources.ray import _set_auth_mode, is_loopback_address, single_node_ray

        _set_auth_mode("auto")
        if is_loopback_address(address):
            single_node_ray()  # else Ray rewrites 127.0.0.1 to the machine's address and cannot connect
        ray.init(address=address, log_to_driver=False)
        _client_address["address"] = address if address.startswith("ray://") else None

    def start_http(self) -> None:
        from ray import serve

        self.connect()
        serve.start(http_options={"host": self.http_host, "port": self.http_port})

    # --- state ------------------------------------------------------------------------------------------

    def application(self, name: str) -> dict[str, Any] | None:
        """Serve's status of application ``name`` (``serve.status()``): ``{"status", "message",
        "deployments": {name: {"status", "message", "replicas": {state: count}}}}``, or None."""
        from ray import serve

        self.connect()
        try:
            app = serve.status().applications.get(name)
        except Exception:  # Serve not started on this cluster yet
            return None
        if app is None:
            return None
        return {"status": str(getattr(app.status, "value", app.status)), "message": app.message,
                "deployments": {dep_name: {"status": str(getattr(dep.status, "value", dep.status)),
                                           "message": dep.message,
                                           "replicas": {str(getattr(s, "value", s)): n
                                                        for s, n in dep.replica_states.items()}}
                                for dep_name, dep in app.deployments.items()}}

    def deployed(self, name: str) -> dict[str, Any]:
        """What application ``name`` runs: ``{"route_prefix", "deployment", "code_version", "user_config",
        "options"}``; ``options`` are the deployment options (num_replicas, autoscaling_config,
        max_ongoing_requests, max_queued_requests, retry_after_s, ray_actor_options)."""
        self.connect()
        app = (_serve_details(name).get("applications") or {}).get(name)
        if app is None:
            raise ServeError(f"no Serve application named {name!r}; deploy it first")
        ((dep_name, dep),) = (app.get("deployments") or {}).items()
        config = dep.get("deployment_config") or {}
        options = {
            "num_replicas": config.get("num_replicas") or 1,
            "autoscaling_config": config.get("autoscaling_config"),
            "max_ongoing_requests": config.get("max_ongoing_requests"),
            "max_queued_requests": config.get("max_queued_requests"),
            "retry_after_s": (config.get("backpressure_config") or {}).get("retry_after_s"),
            "ray_actor_options": config.get("ray_actor_options"),
        }
        return {"route_prefix": app.get("route_prefix") or f"/{name}", "deployment": dep_name,
                "code_version": dep["code_version"], "user_config": dict(config.get("user_config") or {}),
                "options": options}

    def urls(self, name: str) -> dict[str, Any]:
        """Where application ``name`` answers: ``proxy`` (Serve's HTTP proxy, the contract URL) and ``direct``
        (each replica's own port when the cluster runs direct ingress, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``;
        empty otherwise)."""
        self.connect()
        details = _serve_details()
        app = (details.get("applications") or {}).get(name)
        if app is None:
            raise ServeError(f"no Serve application named {name!r}")
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        http = details.get("http_options") or {}
        host = http.get("host") or "127.0.0.1"
        loopback = host in ("127.0.0.1", "localhost", "::1")
        proxy_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        direct = []
        for group in details.get("target_groups") or []:
            if group.get("app_name") == name and str(group.get("protocol", "")).upper().endswith("HTTP"):
                for target in group.get("targets") or []:
                    if target.get("port") != http.get("port") and not str(target.get("name")).startswith(
                            "SERVE_PROXY"):  # nor the fallback proxy HAProxy has while no replica runs
                        # Replicas bind the proxy's host: on a loopback-only cluster their node IP is
                        # unreachable.
                        direct.append(f"http://{host if loopback else target['ip']}:{target['port']}{prefix}")
        return {"proxy": f"http://{proxy_host}:{http.get('port', 8000)}{prefix}", "direct": sorted(direct)}

    def url(self, name: str) -> str:
        """The contract URL of application ``name`` (Serve's proxy, from this resource's settings)."""
        return f"http://{self.http_host}:{self.http_port}/{name}"

    def health(self, name: str) -> tuple[int, Any]:
        return http_json(f"{self.url(name)}/health", timeout=10.0)

    def info(self, name: str) -> tuple[int, Any]:
        return http_json(f"{self.url(name)}/info", timeout=10.0)

    def predict(self, name: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, Any]:
        return http_json(f"{self.url(name)}/predict", body, timeout=timeout)

    def served_model_uri(self, name: str) -> str | None:
        """The model URI the running application answers with; None when it is not deployed or answering."""
        app = self.application(name)
        if app is None or app["status"] != "RUNNING":
            return None
        status, health = self.health(name)
        return health.get("model_uri") if status == 200 and isinstance(health, dict) else None

    def replica_stats(self, urls: list[str]) -> list[dict[str, Any]]:
        """Each replica's challenger counters (``/info`` → ``serving.challenger``) at ``urls`` (the direct
        URLs, one per replica, or the proxy); :class:`ServeError` when one does not answer."""
        out = []
        for url in urls:
            status, info = http_json(f"{url}/info", timeout=10.0)
            if status != 200 or not isinstance(info, dict):
                raise ServeError(f"the replica stats at {url}/info did not answer "
                                 f"({status}: {str(info)[:300]})")
            out.append((info.get("serving") or {}).get("challenger") or {})
        return out

    def probe(self, name: str, body: dict[str, Any]) -> Callable[[], None]:
        """A function that sends ``body`` to ``/predict`` once (probe traffic for a rollout step)."""
        url = f"{self.url(name)}/predict"

        def send() -> None:
            http_json(url, body, timeout=10.0)  # the replicas' counters judge the step, not this answer

        return send

    # --- changes ----------------------------------------------------------------------------------------

    def run(self, name: str, app: Any, revision: str, *, restore: Any = None,
            timeout_s: float | None = None) -> dict[str, Any]:
        """Deploy ``app`` (a ``serve.Application``) as application ``name`` at ``/<name>``, or update the
        running one: the same code version with a new user_config hot-reloads the live replicas, new
        deployment options (replicas, CPUs, autoscaling) apply to them, a new code version rolls replicas
        onto it. Returns ``{"action", "status", "urls"}`` once every replica reports config ``revision`` on
        /health (``status``: one replica's /health).

        Fails fast when Serve reports the deployment DEPLOY_FAILED or UNHEALTHY, with Serve's reason, or when
        a replica rejects the config (:class:`ReloadError`). On an update that failed, ``restore`` (the
        application that ran before) is deployed again before the error is raised."""
        from ray import serve

        self.start_http()
        before = self.application(name)
        action = "reconfigured" if before is not None and before["status"] == "RUNNING" else "deployed"
        timeout_s = self.reload_timeout_s if timeout_s is None else timeout_s
        self._submit(serve, name, app)
        try:
            status = self._wait_applied(name, revision, timeout_s)
        except ServeError:
            if restore is not None and action == "reconfigured":
                self._submit(serve, name, restore)
                self._wait_running(name, timeout_s)
            raise
        return {"action": action, "status": status, "urls": self.urls(name)}

    def reconfigure(self, name: str, changes: dict[str, Any], rebuild: Callable[..., tuple[Any, str]], *,
                    merge: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
        """Hot-reload application ``name`` with ``changes`` merged into its running user_config (or
        replacing it, ``merge=False``), keeping its code version and deployment options. ``rebuild(deployed,
        user_config)`` builds the application and its revision (``ocm_ml.serve.deployments.rebuild_app``).
        Returns a replica's /health after the swap; on failure the previous user_config runs again and
        :class:`ReloadError` (or :class:`ServeError`) says why."""
        deployed = self.deployed(name)
        old = deployed["user_config"]
        app, revision = rebuild(deployed, {**old, **changes} if merge else dict(changes))
        return self.run(name, app, revision, restore=rebuild(deployed, old)[0], timeout_s=timeout_s)["status"]

    def delete(self, name: str) -> None:
        """Remove the application (nothing happens when it does not exist)."""
        from ray import serve

        self.connect()
        serve.delete(name)

    # --- internals --------------------------------------------------------------------------------------

    @staticmethod
    def _submit(serve: Any, name: str, app: Any) -> None:
        """Hand ``app`` to Serve without waiting (``serve.run`` would wait, without end, for RUNNING)."""
        serve.run_many([serve.RunTarget(target=app, name=name, route_prefix=f"/{name}")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)

    def _wait_running(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Poll ``serve.status()`` until ``name`` is RUNNING; :class:`ServeError` with Serve's reason as soon
        as it or a deployment is DEPLOY_FAILED/UNHEALTHY, or when ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        app = None
        while time.monotonic() < deadline:
            app = self.application(name)
            if app is not None:
                if app["status"] == "RUNNING":
                    return app
                failed = [f"{dep} {d['status']}: {d['message']}" for dep, d in app["deployments"].items()
                          if d["status"] in FAILED_STATES]
                if app["status"] in FAILED_STATES or failed:
                    raise ServeError(f"Serve could not deploy {name!r} ({app['status']}): "
                                     f"{'; '.join(failed) or app['message']}")
            time.sleep(0.25)
        raise ServeError(f"{name!r} is not RUNNING after {timeout_s:.0f}s (Serve says "
                         f"{app and app['status']}: {app and (app['message'] or app['deployments'])})")

    def _wait_applied(self, name: str, revision: str, timeout_s: float) -> dict[str, Any]:
        """Wait until Serve runs ``name`` and each of its running replicas reports config ``revision`` on
        /health (through each replica's own port under direct ingress, else through the proxy)."""
        deadline = time.monotonic() + timeout_s
        app = self._wait_running(name, timeout_s)
        replicas = max(1, sum(d["replicas"].get("RUNNING", 0) for d in app["deployments"].values()))
        seen: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            urls = self.urls(name)
            for url in urls["direct"] or [urls["proxy"]] * 4:
                code, status = http_json(f"{url}/health", timeout=10.0)
                if not isinstance(status, dict) or "config_revision" not in status:
                    continue
                if status.get("failed_revision") == revision:
                    raise ReloadError(
                        f"replica {status.get('replica_id')} of {name!r} rejected the new user_config and "
                        f"still serves {status.get('model_uri')}: {status.get('last_reload_error')}")
                if status["config_revision"] == revision:
                    seen[status.get("replica_id") or url] = status
            if len(seen) >= replicas:
                return next(iter(seen.values()))
            time.sleep(0.25)
        raise ReloadError(f"{len(seen)} of {replicas} replicas of {name!r} applied the new config within "
                          f"{timeout_s:.0f}s")


def _connected_address() -> str | None:
    """The address of the Ray this process is connected to: ``ray://…`` in Ray Client mode, else the GCS."""
    import ray
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():
        from ocm_resources.ray import _current_address

        return _client_address["address"] or _current_address()
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ocm_resources.serve_control")
    sub = p.add_subparsers(dest="cmd", required=True)
    http = sub.add_parser("start-http", help="start Serve's HTTP proxy on the cluster at RAY_ADDRESS")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    import os

    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ServeControl(address=address, http_host=args.host, http_port=args.port).start_http()
    except ServeError as exc:
        print(f"serve_control: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

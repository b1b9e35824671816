"""Ray Serve control: deploy or hot-reload the endpoint applications on a long-lived Ray cluster.

A Serve application started on a Ray that the step process itself started dies with that process, so the
embedded default deploys to the local head that ``make dev``/``make demo`` run (``scripts/dev.sh``), and
refuses an in-process Ray with a clear message.

    python -m ocm_resources.serve_control start-http --host 127.0.0.1 --port 8000   # on RAY_ADDRESS
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import dagster as dg
from pydantic import Field


class ServeError(RuntimeError):
    """Serve could not do what was asked; the message says what to check."""


class ServeControl(dg.ConfigurableResource):
    """Deploys and reconfigures ocm's Serve applications (one per family, route prefix ``/<family>``).

    Example::

        serve = ServeControl(address="auto", temp_dir=".ocm/ray")    # the local head of `make dev`
        serve.deploy_or_reconfigure("fashion_mnist", "image", {"model_uri": ..., "tracking_uri": ...,
                                                               "registry_url": ...})
    """

    address: str | None = Field(
        default="auto",
        description='Long-lived Ray cluster: "auto" = the local head recorded in temp_dir (make dev), '
        '"host:port" = that head; None = the Ray this process is already connected to (tests).',
    )
    temp_dir: str | None = Field(default=None, description="Temp folder of the local head (`ray start --temp-dir`).")
    http_host: str = Field(default="127.0.0.1", description="Serve HTTP host.")
    http_port: int = Field(default=8000, description="Serve HTTP port.")
    reload_timeout_s: float = Field(default=300.0, description="Seconds a hot reload may take.")

    def connect(self) -> None:
        import ray

        if self.address is None:
            if not ray.is_initialized():
                raise ServeError("ServeControl(address=None) needs a Ray this process is already connected to")
            return
        from ocm_resources.ray import local_head_address

        address = self.address
        if address == "auto":
            address = local_head_address(self.temp_dir)
            if address is None:
                raise ServeError(
                    "no long-lived local Ray head is running (a Serve app on an in-process Ray would die with "
                    "the step): start one with `make dev` (or `scripts/dev.sh ray-up`), or set the Ray address"
                )
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if current and current.split(":")[-1] == address.split(":")[-1]:
                return
            raise ServeError(
                f"this process is connected to Ray at {current}, not to the long-lived cluster {address}; "
                "run the endpoint step in its own process (the default multiprocess executor does)"
            )
        from ocm_resources.ray import _set_auth_mode, _single_node_ray, is_loopback_address

        _set_auth_mode("auto")
        if is_loopback_address(address):
            _single_node_ray()  # else Ray rewrites 127.0.0.1 to the machine's address and cannot connect
        ray.init(address=address, log_to_driver=False)

    def start_http(self) -> None:
        from ray import serve

        self.connect()
        serve.start(http_options={"host": self.http_host, "port": self.http_port})

    def application(self, name: str) -> dict[str, Any] | None:
        from ray import serve

        self.connect()
        try:
            details = serve.status()
        except Exception:
            return None
        app = details.applications.get(name)
        return None if app is None else {"status": str(app.status), "message": app.message}

    def deploy_or_reconfigure(
        self, name: str, kind: str, user_config: dict[str, Any], *, num_replicas: int = 1,
        max_ongoing_requests: int = 64, autoscaling_config: dict[str, Any] | None = None,
        ray_actor_options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """First time: deploy the application; later: hot-reload its replicas through ``reconfigure`` (no
        redeploy). Returns ``{"action", "status", "urls"}``."""
        from ocm_ml.serve import deployments

        self.start_http()
        current = self.application(name)
        if current is None or "RUNNING" not in current["status"]:
            app = deployments.build_app(kind, user_config, num_replicas=num_replicas,
                                        max_ongoing_requests=max_ongoing_requests,
                                        autoscaling_config=autoscaling_config,
                                        ray_actor_options=ray_actor_options)
            deployments.deploy(app, name, f"/{name}")
            status = deployments._wait_applied(  # noqa: SLF001 - the same readiness probe as reconfigure
                name, deployments.config_hash(user_config), 1, self.reload_timeout_s)
            action = "deployed"
        else:
            status = deployments.reconfigure(name, user_config, timeout_s=self.reload_timeout_s)
            action = "reconfigured"
        return {"action": action, "status": status, "urls": deployments.endpoint_urls(name)}

    def urls(self, name: str) -> dict[str, Any]:
        """The application's URLs: ``{"proxy": …, "direct": [replica URLs]}``."""
        from ocm_ml.serve import deployments

        self.connect()
        return deployments.endpoint_urls(name)

    def delete(self, name: str) -> None:
        """Remove the application (nothing happens when it does not exist)."""
        from ray import serve

        self.connect()
        serve.delete(name)

    def url(self, name: str) -> str:
        return f"http://{self.http_host}:{self.http_port}/{name}"


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

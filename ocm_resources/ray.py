"""Ray compute for ocm, built on dagster-ray.

Assets annotate dagster-ray's :class:`~dagster_ray.RayResource` (re-exported here); after the resource is
set up, the step process is connected (``ray.init`` done) whatever the backend:

- :class:`RayHead` (local environment, tests, or any Ray address): connects to a running head (``address``:
  "auto" finds the local one that ``ray start --head``/``make dev`` recorded; ``host:port`` or
  ``ray://host:port`` for an explicit one) or starts Ray in-process. It reuses a Ray this process already
  has and never shuts down a Ray it did not start.
- :func:`kuberay_resource` (cluster environment): dagster-ray's ``KubeRayInteractiveJob`` or
  ``KubeRayCluster``, configured from a few arguments.

``ray`` is imported inside methods only; importing this module stays cheap.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

from dagster_ray import LocalRay, RayResource
from dagster_ray.configs import RayDataExecutionOptions
from dagster_ray.types import AnyDagsterContext
from dagster_ray.utils import _process_dagster_env_vars
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from ray._private.worker import BaseContext as RayBaseContext

__all__ = [
    "RayConnectionError",
    "RayHead",
    "RayResource",
    "cluster_resources",
    "kuberay_resource",
    "local_head_address",
]

MiB = 1024**2
RAY_CLIENT_PORT = 10001
# Ray ends an idle worker process after 1 s by default. Every epoch, Ray Data's read tasks then wait ~1 s for
# a new Python process (measured: task scheduling 1.1 s vs 0.01 s warm) while the DDP workers idle; between
# two epochs lie validation and a checkpoint, several seconds. Keeping idle workers for a minute removes that
# stall (benchmarks/ddp_vs_single.py). Heads that ocm starts get it: in-process here, `make dev`
# (scripts/dev.sh) and KubeRay (deploy/kuberay) through the environment variable of the same name.
IDLE_WORKER_KEEP_MS = 60_000
IDLE_WORKER_CONFIG_KEY = "idle_worker_killing_time_threshold_ms"


def system_config(idle_worker_keep_ms: int = IDLE_WORKER_KEEP_MS) -> dict[str, int]:
    """The ``_system_config`` of ``ray.init`` for a Ray that ocm starts in-process (see
    IDLE_WORKER_KEEP_MS)."""
    return {IDLE_WORKER_CONFIG_KEY: idle_worker_keep_ms}


def single_node_ray() -> None:
    """Make this process start its Ray as a single-node cluster on loopback (:data:`LOCAL_RAY_ENV` of
    ``ocm_resources.env``). Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, when ``ray`` is first imported; a process that
    imported Ray before gets the same value set there (``services.get_node_ip_address`` reads it per call)."""
    import sys

    from ocm_resources.env import local_ray_environment

    env = local_ray_environment()  # refuses RAY_AUTH_MODE other than token
    env.pop("RAY_AUTH_MODE")  # ray.init turns token auth on by itself for a new cluster (checked after)
    os.environ.update(env)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        # Ray 2.60 has no public API for this: the flag lives only in its private constants module
        constants.ENABLE_RAY_CLUSTER = False  # pyright: ignore[reportAttributeAccessIssue]


def is_loopback_address(address: str) -> bool:
    """``127.0.0.1:6379``, ``localhost:6379`` (not a ``ray://`` client address): a head on this machine's
    loopback, which a driver reaches only as a single-node cluster (see :func:`single_node_ray`)."""
    if address.startswith("ray://"):
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def start_loopback_ray(**init_kwargs: Any) -> Any:
    """``ray.init(address="local", …)`` for a Ray that ocm starts in this process (RayHead, tests,
    benchmarks): every listener of that head on 127.0.0.1 and token authentication on, or it fails.

    Listeners and the setting that puts each on loopback (Ray 2.60): GCS, raylet, every worker's gRPC
    server, dashboard (``dashboard_host``), dashboard agent gRPC/HTTP/metrics export, runtime-env agent and
    autoscaler-monitor metrics: the node IP 127.0.0.1 (``_node_ip_address`` with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, see ``ocm_resources.env.LOCAL_RAY_ENV``); Serve HTTP and
    direct-ingress replica ports: ``http_options.host`` (``ocm_resources.env.serve_host``). An in-process
    head has no Ray Client server. One listener has no setting: each Serve replica's inter-deployment gRPC
    server (``ray/serve/_private/replica.py``, ``_on_initialized``: ``add_port_to_grpc_server(self._server,
    "[::]:0")``) binds all interfaces; it carries Ray's token interceptor, which is why token auth must be
    on. Serve's gRPC proxy/ingress (``grpc_util.start_grpc_server``, ``[::]:port``) would be another; ocm
    configures no gRPC servicers, so it never starts."""
    import ray

    from ocm_resources.env import LOOPBACK

    single_node_ray()
    kwargs = {"dashboard_host": LOOPBACK, **init_kwargs, "_node_ip_address": LOOPBACK}
    kwargs.pop("address", None)
    context = ray.init(address="local", **kwargs)
    problem = _loopback_problem()
    if problem:
        ray.shutdown()
        raise RayConnectionError(f"Refusing the in-process Ray head: {problem}")
    return context


def _loopback_problem() -> str | None:
    """Why the Ray this process started is not a loopback head with token auth, or None."""
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray.util import get_node_ip_address

    from ocm_resources.env import LOOPBACK

    node_ip = get_node_ip_address()  # public: this process's node (ray._private.worker._global_node)
    gcs = ray.get_runtime_context().gcs_address
    if node_ip != LOOPBACK or not gcs.startswith(f"{LOOPBACK}:"):
        return (f"its node IP is {node_ip} and its GCS {gcs}, not {LOOPBACK} (its ports would be on the "
                "network)")
    if not is_token_auth_enabled():
        return "token authentication is off (RAY_AUTH_MODE)"
    return None


_TOKEN_HINT = (
    "Ray >= 2.52 heads use token authentication by default: this process needs the head's token "
    "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE=token "
    "(RayHead sets it when a token is available)."
)
_FIX_HINT = "Start the local Ray head with `make dev`, or fix RAY_ADDRESS / the resource's `address`."

# The Ray Client address this process connected to through RayHead (Ray does not report it).
_process_ray: dict[str, str | None] = {"address": None}


class RayConnectionError(ConnectionError):
    """Ray could not be reached or started; the message names the address and what to do."""


def cluster_resources() -> dict[str, float]:
    """Total resources of the Ray cluster this process is connected to (``{"CPU": 2.0, ...}``).

    Works with every ``RayResource`` once the resource is set up (inside the asset body)."""
    import ray

    if not ray.is_initialized():
        raise RayConnectionError(
            "Ray is not initialised in this process: request a Ray resource in the asset so Dagster sets "
            "it up"
        )
    return {key: float(value) for key, value in ray.cluster_resources().items()}


def _split_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``ray://host[:port]`` (Ray Client's default port 10001)."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep:
        if address.startswith("ray://"):
            return rest, RAY_CLIENT_PORT
        raise RayConnectionError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise RayConnectionError(f"Ray address {address!r} has no valid port") from None


def _tcp_check(address: str, timeout: float) -> str | None:
    """None when something listens at ``address``, else the reason."""
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _address_file(temp_dir: str | None) -> str:
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(temp_dir)
    except ImportError:  # layout of older/newer Ray
        base = temp_dir or os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray")
        return os.path.join(base, "ray_current_cluster")


def local_head_address(temp_dir: str | None = None, timeout: float = 1.0) -> str | None:
    """The GCS address (``host:port``) of the local head that ``ray start --head`` recorded in
    ``<temp_dir>/ray_current_cluster``, when that head answers; None otherwise (no file, or a file left
    behind by a killed head)."""
    path = _address_file(temp_dir)
    try:
        with open(path) as fh:
            address = fh.read().strip()
    except OSError:
        return None
    if not address:
        return None
    try:
        return address if _tcp_check(address, timeout) is None else None
    except RayConnectionError:
        return None


def _set_auth_mode(mode: Literal["auto", "token", "disabled"]) -> None:
    """Ray token authentication for this process before it connects to an existing cluster.

    Ray enables token auth by itself only for a cluster it starts, or finds with address None/"auto"; with an
    explicit address it never does, and the connection fails. "auto" turns it on when RAY_AUTH_MODE is unset
    and a token is available; "token"/"disabled" set RAY_AUTH_MODE."""
    try:
        # Ray 2.60 has no public API for this (Config is in the compiled _raylet, which ships no stub)
        from ray._private.authentication import authentication_token_setup as auth
        from ray._raylet import Config  # pyright: ignore[reportAttributeAccessIssue]
    except ImportError:  # another Ray layout: the environment variable is the public interface
        if mode != "auto":
            os.environ["RAY_AUTH_MODE"] = mode
        return
    if mode == "auto":
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
        Config.initialize("")  # Ray caches its config: make this process see the new mode


def _current_address() -> str | None:
    """The address of the Ray this process is connected to: ``ray://…`` in Ray Client mode, else the GCS."""
    import ray
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():
        return _process_ray["address"]
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:
        return None


class RayHead(LocalRay):
    """Ray for the local environment and tests: a running head, or Ray started in-process.

    ``address``: None starts Ray in-process (``ray.init(address="local")``, which ignores a
    ``ray_current_cluster`` file left behind by a killed head); "auto" connects to ``RAY_ADDRESS`` or the
    local head recorded by ``ray start --head`` (``make dev``), falling back to in-process when
    ``start_local_if_no_head``; ``host:port`` / ``ray://host:port`` connect there. A Ray this process
    already runs is reused and left running; an explicit address that does not answer fails within
    ``connect_timeout``.

    Example::

        ray_cluster = RayHead(address="auto", start_local_if_no_head=True, num_cpus=2)

        @dg.asset
        def model(ray_cluster: RayResource):
            import ray
            ...  # ray.get(...), TorchTrainer(...).fit(); cluster_resources() for metadata
    """

    address: str | None = Field(
        default=None,
        description='Ray to use: None = start in-process; "auto" = RAY_ADDRESS or the local head recorded in '
        '`<temp_dir>/ray_current_cluster`; "host:port" (GCS) or "ray://host:port" (Ray Client).',
    )
    start_local_if_no_head: bool = Field(
        default=False,
        description='With address="auto": start Ray in-process when no head answers (RAY_ADDRESS unset and '
        "no live head recorded), instead of failing.",
    )
    temp_dir: str | None = Field(
        default=None,
        description="Ray temp folder of the local head (`ray start --temp-dir`), where it records its "
        "address; Ray's default (/tmp/ray) when unset.",
    )
    num_cpus: int | None = Field(
        default=None, description="CPUs of an in-process Ray; all cores when unset. Ignored when connecting."
    )
    object_store_memory: int = Field(
        default=512 * MiB,
        description="Object store bytes of an in-process Ray (Ray's default reserves ~30% of RAM).",
    )
    include_dashboard: bool = Field(
        default=False, description="Start the dashboard with an in-process Ray (on `dashboard_port`)."
    )
    idle_worker_keep_ms: int = Field(
        default=IDLE_WORKER_KEEP_MS,
        description="How long an in-process Ray keeps an idle worker process before ending it (Ray's "
        "`idle_worker_killing_time_threshold_ms`, 1000 by default): long enough that each epoch's data "
        "read reuses a warm process. Ignored when connecting (set RAY_idle_worker_killing_time_threshold_ms "
        "on that head).",
    )
    keep_alive: bool = Field(
        default=False,
        description="Leave the Ray this resource started or connected running after the step, so later steps "
        "in the same process reuse it (in-process executor, tests, notebooks).",
    )
    connect_timeout: float = Field(
        default=5.0, description="Seconds to wait for an explicit address to accept a TCP connection."
    )
    auth_mode: Literal["auto", "token", "disabled"] = Field(
        default="auto",
        description='Ray token authentication for connecting: "auto" = token when RAY_AUTH_MODE is unset '
        'and a token is available (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH); "token" / '
        '"disabled" set RAY_AUTH_MODE for this process.',
    )

    jobs_url: str | None = Field(
        default=None,
        description="The head's dashboard (Ray Jobs API), e.g. http://ray-head:8265, where training runs as "
        "a Ray Job when `address` is a Ray Client address (ray://; Ray Data does not run in a Ray Client "
        "driver). Unset: http://<host of the ray:// address>:<dashboard_port>.",
    )

    _mode: Literal["started", "connected", "reused"] | None = PrivateAttr(default=None)
    _resolved_address: str | None = PrivateAttr(default=None)

    # -- dagster-ray's RayResource interface -------------------------------------------------------

    @property
    def name(self) -> str:
        return "RayHead"

    @property
    def display_name(self) -> str:
        if self._mode == "started" or (self._mode is None and self.address is None):
            return "in-process Ray"
        return f"Ray at {self._resolved_address or self.address}"

    @property
    def host(self) -> str:
        if self._resolved_address:
            return _split_address(self._resolved_address)[0]
        return "127.0.0.1"

    @property
    def ray_address(self) -> str | None:  # type: ignore[override]
        """The address connected to (None for an in-process Ray)."""
        return self._resolved_address

    @property
    def connected(self) -> bool:
        return self._mode is not None

    @property
    def mode(self) -> str | None:
        """How this resource got its Ray: "started" (in-process), "connected" (to a head) or "reused"."""
        return self._mode

    def connect(self, context: AnyDagsterContext) -> RayBaseContext | None:  # type: ignore[override]
        import ray

        log = context.log
        if ray.is_initialized():
            current = _current_address()
            self._check_reusable(current)
            self._mode = "reused"
            self._resolved_address = current
            return None

        address = self._resolve_address(log)
        init_options = self._init_options()
        if address is None:
            self._context = self._start_in_process(init_options)
            self._mode = "started"
            _process_ray["address"] = None
        else:
            self._context = self._connect_to(address, init_options)
            self._mode = "connected"
            self._resolved_address = address
            _process_ray["address"] = address
        if self.data_execution_options.model_dump() != RayDataExecutionOptions().model_dump():
            self.data_execution_options.apply()
        return self._context

    def on_connect(self, context: AnyDagsterContext) -> None:
        if context.log is None:
            return
        what = {"started": "Started", "connected": "Connected to", "reused": "Reusing"}.get(
            self._mode or "", ""
        )
        try:
            cpus = cluster_resources().get("CPU", 0.0)
        except Exception:  # informational only
            cpus = float("nan")
        context.log.info(f"{what} {self.display_name} ({cpus:g} CPUs)")

    def cleanup(self, context: AnyDagsterContext, exception: BaseException | None) -> None:
        mode, name = self._mode, self.display_name
        self._mode, self._context = None, None
        if mode in ("started", "connected") and not self.keep_alive:
            import ray

            ray.shutdown()  # stops an in-process Ray; only disconnects from a head
            _process_ray["address"] = None
            if context.log is not None:
                context.log.info(f"{'Shut down' if mode == 'started' else 'Disconnected from'} {name}")

    # -- accessors --------------------------------------------------------------------------------

    @property
    def is_client(self) -> bool:
        """True when this resource reaches Ray through Ray Client (``ray://``): drivers that need a core
        worker (Ray Data, Ray Train) then run as Ray Jobs (:meth:`run_job`)."""
        address = self._resolved_address or self.address or ""
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS", "")
        return address.startswith("ray://")

    def jobs_dashboard(self) -> str:
        """The head's dashboard URL for Ray Jobs (``jobs_url``, or derived from the ray:// address)."""
        if self.jobs_url:
            return self.jobs_url.rstrip("/")
        address = self._resolved_address or self.address or ""
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS", "")
        if not address.startswith("ray://"):
            raise RayConnectionError(f"No dashboard URL for Ray Jobs: set jobs_url (address {address!r})")
        return f"http://{_split_address(address)[0]}:{self.dashboard_port}"

    def run_job(self, module: str, spec: Mapping[str, Any], result_path: str,
                **kwargs: Any) -> dict[str, Any]:
        """Run ``python -m <module> '<spec json>'`` as a Ray Job on the head and return the JSON result its
        driver wrote at ``result_path`` (see :func:`ocm_resources.ray_jobs.run_job` for the keywords)."""
        from ocm_resources.ray_jobs import run_job

        return run_job(self.jobs_dashboard(), module, spec, result_path=result_path, **kwargs)

    def cluster_resources(self) -> dict[str, float]:
        """Total resources of the connected cluster, e.g. ``{"CPU": 2.0, "memory": ...}``."""
        return cluster_resources()

    # -- internals --------------------------------------------------------------------------------

    def _resolve_address(self, log: Any) -> str | None:
        address = self.address
        if address in (None, "local"):
            return None
        if address == "auto":
            env_address = os.environ.get("RAY_ADDRESS", "").strip()
            if env_address == "local":
                return None
            if env_address:
                self._check_tcp(env_address, source="RAY_ADDRESS")
                return env_address
            found = local_head_address(self.temp_dir, timeout=min(self.connect_timeout, 2.0))
            if found:
                return found
            where = _address_file(self.temp_dir)
            if self.start_local_if_no_head:
                if log is not None:
                    log.info(f"No live Ray head recorded in {where}; starting Ray in-process")
                return None
            raise RayConnectionError(
                f"No running Ray head found (RAY_ADDRESS is unset and {where} is missing or names a head "
                f"that does not answer). {_FIX_HINT}"
            )
        self._check_tcp(address, source="address")
        return address

    def _check_tcp(self, address: str, source: str) -> None:
        reason = _tcp_check(address, self.connect_timeout)
        if reason is not None:
            raise RayConnectionError(
                f"Ray at {address} (from {source}) is unreachable: {reason} "
                f"(waited {self.connect_timeout:g}s). {_FIX_HINT}"
            )

    def _check_reusable(self, current: str | None) -> None:
        """An explicit address must be the Ray this process is already connected to."""
        if self.address in (None, "local", "auto") or current is None:
            return
        wanted_client = self.address.startswith("ray://")
        # Ray reports 127.0.0.1 as the node's IP address: compare the kind of address and the port
        if wanted_client == current.startswith("ray://") and (
            _split_address(current)[1] == _split_address(self.address)[1]
        ):
            return
        raise RayConnectionError(
            f"This process is already connected to Ray at {current}, not to {self.address}: "
            "call ray.shutdown() first, or configure the same address"
        )

    def _init_options(self) -> dict[str, Any]:
        options: dict[str, Any] = _process_dagster_env_vars(dict(self.ray_init_options))
        env_vars = {k: v for k, v in self.get_env_vars_to_inject().items() if v is not None}
        runtime_env = dict(options.pop("runtime_env", None) or {})
        if runtime_env.get("env_vars"):
            env_vars = {**{k: v for k, v in runtime_env["env_vars"].items() if v is not None}, **env_vars}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        if runtime_env:
            options["runtime_env"] = runtime_env
        return options

    def _start_in_process(self, options: dict[str, Any]) -> RayBaseContext:
        from ocm_resources.env import ConfigurationError

        kwargs: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "object_store_memory": self.object_store_memory,
            "include_dashboard": self.include_dashboard,
            "_system_config": system_config(self.idle_worker_keep_ms),
        }
        if self.include_dashboard:
            kwargs["dashboard_port"] = self.dashboard_port
        kwargs.update(options)
        try:
            return start_loopback_ray(**kwargs)
        except (RayConnectionError, ConfigurationError):
            raise
        except Exception as exc:
            hint = ""
            if "timed out during startup" in str(exc):  # Ray gives its raylet a fixed 30 s to register
                load = os.getloadavg()[0]
                hint = f" (load average {load:.1f} on {os.cpu_count()} CPUs: the machine may be overloaded)"
            raise RayConnectionError(f"Could not start Ray in-process: {exc}{hint}") from exc

    def _connect_to(self, address: str, options: dict[str, Any]) -> RayBaseContext:
        import ray
        from ray.exceptions import AuthenticationError

        _set_auth_mode(self.auth_mode)
        if is_loopback_address(address):
            single_node_ray()  # else Ray rewrites 127.0.0.1 to the machine's address and cannot connect
        # The Ray Client proxy starts a server process per client; on a busy machine that start
        # sometimes fails ("Initialization failure from server") and a second attempt succeeds.
        attempts = 2 if address.startswith("ray://") else 1
        for attempt in range(1, attempts + 1):
            try:
                return ray.init(address=address, **options)
            except AuthenticationError as exc:
                raise RayConnectionError(
                    f"Ray at {address} refused the connection: {exc}. {_TOKEN_HINT}"
                ) from exc
            except ConnectionAbortedError as exc:
                if attempt < attempts:
                    continue
                raise RayConnectionError(
                    f"The Ray Client server at {address} failed to start a session for this process: {exc}. "
                    "See ray_client_server_*.err in the head's session logs."
                ) from exc
            except (ConnectionError, TimeoutError, RuntimeError) as exc:
                raise RayConnectionError(
                    f"Could not connect to Ray at {address}: {exc}. {_TOKEN_HINT} {_FIX_HINT}"
                ) from exc
        raise AssertionError("unreachable")


def kuberay_resource(
    *,
    kind: Literal["interactive_job", "cluster"] = "interactive_job",
    namespace: str = "ray",
    image: str | None = None,
    ray_version: str | None = None,
    head_cpu: str = "1",
    head_memory: str = "4Gi",
    worker_cpu: str = "2",
    worker_memory: str = "8Gi",
    min_workers: int = 0,
    max_workers: int = 2,
    token_auth: bool = True,
    auth_secret_name: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    ray_init_options: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
    kube_context: str | None = None,
    kube_config: str | None = None,
) -> RayResource:
    """dagster-ray's KubeRay resource for the cluster environment: a ``KubeRayInteractiveJob`` (default;
    KubeRay >= 1.3: a RayJob in interactive mode, its cluster removed by KubeRay when the step ends) or a
    ``KubeRayCluster`` (a RayCluster per step, or shared with ``cluster_sharing``).

    ``image`` defaults to the run's ``dagster/image`` tag; it must contain ocm and ``ray[train,tune,serve]``.
    With ``token_auth`` (Ray >= 2.52) KubeRay guards the cluster with a token (from Secret
    ``auth_secret_name``, key ``auth_token``, or one it generates): the step pod then needs
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` from that Secret.
    """
    import copy

    from dagster_ray.kuberay import KubeRayCluster, KubeRayInteractiveJob
    from dagster_ray.kuberay.configs import (
        DEFAULT_HEAD_GROUP_SPEC,
        DEFAULT_WORKER_GROUP_SPECS,
        AuthOptions,
        RayClusterConfig,
        RayClusterSpec,
    )
    from dagster_ray.kuberay.resources.raycluster import KubeRayClusterClientResource
    from dagster_ray.kuberay.resources.rayjob import (
        InteractiveRayJobConfig,
        InteractiveRayJobSpec,
        KubeRayJobClientResource,
    )

    if min_workers < 0 or max_workers < min_workers:
        raise ValueError(f"need 0 <= min_workers <= max_workers, got {min_workers} and {max_workers}")
    version = ray_version or metadata.version("ray")

    def resources(cpu: str, memory: str) -> dict[str, Any]:
        return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}

    head = copy.deepcopy(DEFAULT_HEAD_GROUP_SPEC)
    head["template"]["spec"]["containers"][0]["resources"] = resources(head_cpu, head_memory)
    worker = copy.deepcopy(DEFAULT_WORKER_GROUP_SPECS[0])
    worker.update(replicas=min_workers, minReplicas=min_workers, maxReplicas=max_workers)
    worker["template"]["spec"]["containers"][0]["resources"] = resources(worker_cpu, worker_memory)
    for group in (head, worker):
        group["template"]["spec"]["containers"][0].setdefault("env", []).append(
            {"name": f"RAY_{IDLE_WORKER_CONFIG_KEY}", "value": str(IDLE_WORKER_KEEP_MS)}
        )
    spec = RayClusterSpec(
        ray_version=version,
        head_group_spec=head,
        worker_group_specs=[worker],
        enable_in_tree_autoscaling=max_workers > min_workers,
        auth_options=AuthOptions(mode="token", secret_name=auth_secret_name) if token_auth else None,
    )
    common: dict[str, Any] = {
        "image": image,
        "timeout": timeout,
        "env_vars": dict(env_vars or {}),
        "ray_init_options": dict(ray_init_options or {}),
    }
    if kind == "interactive_job":
        return KubeRayInteractiveJob(
            ray_job=InteractiveRayJobConfig(
                metadata={"namespace": namespace}, spec=InteractiveRayJobSpec(ray_cluster_spec=spec)
            ),
            client=KubeRayJobClientResource(kube_context=kube_context, kube_config=kube_config),
            **common,
        )
    if kind == "cluster":
        return KubeRayCluster(
            ray_cluster=RayClusterConfig(metadata={"namespace": namespace}, spec=spec),
            client=KubeRayClusterClientResource(kube_context=kube_context, kube_config=kube_config),
            **common,
        )
    raise ValueError(f"kind must be 'interactive_job' or 'cluster', got {kind!r}")

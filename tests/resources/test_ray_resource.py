"""Ray resource: in-process Ray through real materializations (started, reused, shut down only when it
started it), clear and fast failures for addresses that do not answer, and the KubeRay factory's manifests.

The test against a real `ray start --head` with token authentication is marked slow."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from ocm_resources.ray import (
    RayConnectionError,
    RayHead,
    RayResource,
    cluster_resources,
    kuberay_resource,
    local_head_address,
)
from tests.ports import closed_port, os_ports

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_ray(request):
    """A process without Ray, which the test may start and stop: the test is marked ``own_process`` and its
    body runs in a child process (tests/conftest.py); the session's Ray is never touched."""
    import ray

    from tests.conftest import in_own_process

    assert request.node.get_closest_marker("own_process"), "a test using no_ray must be marked own_process"
    if not in_own_process(request.node):
        yield  # this process only waits for the child
        return
    assert not ray.is_initialized()
    yield
    ray.shutdown()


@dg.asset
def probe(ray_cluster: RayResource) -> dg.MaterializeResult:
    import ray

    @ray.remote(num_cpus=1)
    def double(x: int) -> int:
        return 2 * x

    return dg.MaterializeResult(
        metadata={
            "answer": ray.get(double.remote(21)),
            "cpus": cluster_resources()["CPU"],
            "mode": ray_cluster.mode,  # type: ignore[attr-defined]
        }
    )


def materialize_probe(resource: RayResource) -> dict:
    result = dg.materialize([probe], resources={"ray_cluster": resource})
    assert result.success
    return {k: v.value for k, v in result.asset_materializations_for_node("probe")[0].metadata.items()}


def test_importing_the_module_does_not_import_ray():
    code = (
        "import sys, ocm_resources.ray\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'kubernetes', 'mlflow'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT, timeout=120)


@pytest.mark.own_process
@pytest.mark.parametrize(("keep_ms", "all_kept"), [(None, True), (1000, False)])
def test_in_process_ray_keeps_idle_workers_for_the_next_epoch(no_ray, keep_ms, all_kept):
    """Ray ends idle worker processes beyond one per CPU after 1 s; the next data read (every training epoch)
    then waits for a new process. RayHead keeps them for a minute by default; with Ray's 1000 ms they go."""
    import psutil
    import ray

    resource = RayHead(num_cpus=1) if keep_ms is None else RayHead(num_cpus=1, idle_worker_keep_ms=keep_ms)
    resource.connect(dg.build_init_resource_context())
    try:

        @ray.remote(num_cpus=0)
        def pid() -> int:
            time.sleep(1.0)  # concurrent, so each call gets a worker process of its own
            return os.getpid()

        pids = set(ray.get([pid.remote() for _ in range(4)]))
        assert len(pids) > 1
        time.sleep(5)  # idle for 4 s: Ray's default would have ended all but one
        alive = sum(psutil.pid_exists(p) for p in pids)
        assert (alive == len(pids)) is all_kept, (alive, len(pids))
    finally:
        ray.shutdown()


@pytest.mark.own_process
def test_repeated_materializations_start_reuse_and_stop_only_their_own_ray(no_ray):
    """Two Ray starts in all: each costs seconds (tens on a loaded machine)."""
    import ray

    # a resource that started Ray shuts it down after the step; the next run starts it again
    assert materialize_probe(RayHead(num_cpus=1)) == {"answer": 42, "cpus": 1.0, "mode": "started"}
    assert not ray.is_initialized()
    assert materialize_probe(RayHead(num_cpus=1, keep_alive=True))["mode"] == "started"
    assert ray.is_initialized()

    # one that finds Ray running reuses it and leaves it running
    assert materialize_probe(RayHead(num_cpus=2)) == {"answer": 42, "cpus": 1.0, "mode": "reused"}
    assert materialize_probe(RayHead(address="auto"))["mode"] == "reused"
    assert ray.is_initialized()
    assert RayHead().cluster_resources()["CPU"] == 1.0

    # an explicit address that is not the Ray this process runs is refused
    with pytest.raises(dg.DagsterResourceFunctionError) as err:
        dg.materialize([probe], resources={"ray_cluster": RayHead(address="127.0.0.1:6399")})
    assert "already connected to Ray at" in str(err.value.__cause__)
    assert "not to 127.0.0.1:6399" in str(err.value.__cause__)
    assert ray.is_initialized()


@pytest.mark.own_process
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_address_fails_fast_with_a_clear_message(no_ray, scheme):
    import ray

    address = f"{scheme}127.0.0.1:{closed_port()}"
    with pytest.raises(dg.DagsterResourceFunctionError) as err:
        dg.materialize([probe], resources={"ray_cluster": RayHead(address=address, connect_timeout=2)})
    cause = err.value.__cause__
    assert isinstance(cause, RayConnectionError)
    # fast: refused by the resource's own TCP check, bounded by connect_timeout, before ray.init (which
    # retries for minutes) was ever called
    assert f"Ray at {address} (from address) is unreachable" in str(cause) and "(waited 2s)" in str(cause)
    assert "make dev" in str(cause) and "RAY_ADDRESS" in str(cause)
    assert not ray.is_initialized()


@pytest.mark.own_process
def test_auto_uses_ray_address_and_reports_it(no_ray, monkeypatch):
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(RayConnectionError, match=rf"Ray at {address} \(from RAY_ADDRESS\) is unreachable"):
        RayHead(address="auto", connect_timeout=1).connect(dg.build_init_resource_context())


@pytest.mark.own_process
def test_auto_without_a_live_head(no_ray, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp_dir = tmp_path / "ray"
    temp_dir.mkdir()
    assert local_head_address(str(temp_dir)) is None  # no address file
    (temp_dir / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}")
    assert local_head_address(str(temp_dir)) is None  # a file left behind by a killed head
    with pytest.raises(RayConnectionError, match="No running Ray head found.*make dev"):
        RayHead(address="auto", temp_dir=str(temp_dir)).connect(dg.build_init_resource_context())


def test_local_head_address_reads_the_head_file(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        (tmp_path / "ray_current_cluster").write_text(address + "\n")
        assert local_head_address(str(tmp_path)) == address


@pytest.mark.parametrize("kind", ["interactive_job", "cluster"])
def test_kuberay_factory_builds_dagster_ray_resources(kind):
    from importlib import metadata

    from dagster_ray.kuberay import KubeRayCluster, KubeRayInteractiveJob

    resource = kuberay_resource(
        kind=kind,
        namespace="ml",
        image="ghcr.io/acme/ocm:abc",
        worker_cpu="4",
        max_workers=3,
        auth_secret_name="ray-token",
        env_vars={"OCM_ENV": "cluster"},
    )
    assert isinstance(resource, RayResource)
    context = dg.build_init_resource_context()
    if kind == "interactive_job":
        assert isinstance(resource, KubeRayInteractiveJob)
        assert resource.namespace == "ml"
        manifest = resource.ray_job.to_k8s(
            context, image=resource.image, env_vars=resource.get_env_vars_to_inject()
        )
        assert manifest["kind"] == "RayJob" and manifest["spec"]["submissionMode"] == "InteractiveMode"
        cluster = manifest["spec"]["rayClusterSpec"]
    else:
        assert isinstance(resource, KubeRayCluster)
        assert resource.namespace == "ml"
        manifest = resource.ray_cluster.to_k8s(
            context, image=resource.image, env_vars=resource.get_env_vars_to_inject()
        )
        assert manifest["kind"] == "RayCluster"
        cluster = manifest["spec"]
    assert cluster["rayVersion"] == metadata.version("ray")
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "ghcr.io/acme/ocm:abc"
    assert {"name": "OCM_ENV", "value": "cluster"} in head["env"]
    keep = {"name": "RAY_idle_worker_killing_time_threshold_ms", "value": "60000"}
    assert keep in head["env"]
    worker_group = cluster["workerGroupSpecs"][0]
    assert keep in worker_group["template"]["spec"]["containers"][0]["env"]
    assert (worker_group["minReplicas"], worker_group["maxReplicas"]) == (0, 3)
    assert worker_group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "4"


def test_kuberay_factory_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_workers"):
        kuberay_resource(min_workers=3, max_workers=1)
    with pytest.raises(ValueError, match="kind"):
        kuberay_resource(kind="serverless")  # type: ignore[arg-type]


@pytest.mark.own_process
@pytest.mark.slow
def test_connects_to_a_token_protected_ray_start_head(no_ray, monkeypatch):
    """`ray start --head` (Ray 2.60: token auth on) and an explicit address: RayHead enables token mode."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="ocm-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    gcs, client = os_ports(2)  # the head binds them (closed_port would keep them bound)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    log = (temp_dir / "head.log").open("w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs}",
         f"--ray-client-server-port={client}", "--num-cpus=1", "--include-dashboard=false",
         f"--object-store-memory={256 * 1024**2}", f"--temp-dir={temp_dir / 'ray'}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while local_head_address(str(temp_dir / "ray")) is None:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "ray start --head did not come up:\n" + (temp_dir / "head.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        for address in (f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}"):
            metadata = materialize_probe(RayHead(address=address))
            assert metadata == {"answer": 42, "cpus": 1.0, "mode": "connected"}
            assert not ray.is_initialized()  # disconnected; the head keeps running
        assert (
            materialize_probe(RayHead(address="auto", temp_dir=str(temp_dir / "ray")))["mode"] == "connected"
        )
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # the head's processes ignore SIGTERM (FACTS.md)
        head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

"""`make dev` / `make stop` (scripts/dev.sh): the embedded stack listens on loopback only (issue 18), `stop`
leaves no process behind (issue 19), and `start` refuses foreign or stale processes (issue 17).

Each test runs its own stack: OCM_HOME and DAGSTER_HOME in a short temp folder (Ray's socket paths must stay
under 108 bytes) and ports from the OS, so it runs beside other tests' Ray heads and a developer's `make dev`;
a start that finds one of its ports taken meanwhile runs again on new ones (tests/ports.py)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.ports import PortTaken, logs_of, on_free_ports, os_ports, raise_if_taken

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
DEV = ROOT / "scripts" / "dev.sh"
PORT_VARS = (
    "OCM_RAY_PORT",
    "OCM_RAY_CLIENT_PORT",
    "OCM_RAY_DASHBOARD_PORT",
    "OCM_RAY_AGENT_PORT",
    "OCM_SERVE_PORT",
    "OCM_DAGSTER_PORT",
    "OCM_MLFLOW_PORT",
    "OCM_RAY_METRICS_PORT",
)


@pytest.fixture
def stack():
    home = Path(tempfile.mkdtemp(prefix="ocmdev-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCM_", "RAY_", "DAGSTER_"))}
    env.update(OCM_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), OCM_RAY_CPUS="2", OCM_ENV="local")
    env.update(dict(zip(PORT_VARS, map(str, os_ports(len(PORT_VARS))), strict=True)))
    yield home, env
    dev(env, "stop")
    for proc in processes_of(home):  # whatever a failed stop left: end it, the test has failed already
        try:
            proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(home, ignore_errors=True)


def dev(env: dict[str, str], command: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEV), command], env=env, capture_output=True, text=True, timeout=timeout)


def start_stack(home: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`dev start` on ports from the OS (PORT_VARS in ``env``, updated in place); when a service of the stack
    could not bind its port (another process took it since the OS handed it out), `dev stop` and again on
    new ports (tests/ports.py). Any other failure is the test's to report."""

    def start(ports: list[int]) -> subprocess.CompletedProcess:
        env.update(dict(zip(PORT_VARS, map(str, ports), strict=True)))
        logs = home / "logs"
        offsets = {log: log.stat().st_size for log in logs.glob("*.log")}  # the logs are appended to
        started = dev(env, "start")
        try:
            bound = {port for _, port, _ in listeners(stack_tree(home))} if started.returncode == 0 else set()
        except psutil.Error:  # a recorded service ended already
            bound = set()
        if not set(ports) <= bound:
            # with the Ray head's session logs: its dashboard agent only logs that it could not bind
            text = started.stdout + started.stderr + logs_of(logs, offsets=offsets)
            text += logs_of(home / "ray" / "session_latest" / "logs")
            try:
                raise_if_taken(text, "the dev stack", ports)
            except PortTaken:
                dev(env, "stop")
                raise
        return started

    return on_free_ports(len(PORT_VARS), start)


def environ_home(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get("OCM_HOME")
    except psutil.Error:
        return None


def processes_of(home: Path, seen: set[int] = frozenset()) -> list[psutil.Process]:
    """Live processes whose command line names this checkout's .venv or the test's OCM_HOME and that belong
    to this test's stack (command line or environment names its OCM_HOME, or seen in its process tree):
    other engineers' processes of the same .venv run with other OCM_HOMEs."""
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if str(VENV) not in cmd and str(home) not in cmd:
            continue
        if str(home) in cmd or proc.pid in seen or environ_home(proc) == str(home):
            out.append(proc)
    return out


def stack_tree(home: Path) -> list[psutil.Process]:
    """Every process of the running stack: each recorded session leader and all its descendants."""
    procs: dict[int, psutil.Process] = {}
    for pid_file in sorted((home / "run").glob("*.pid")):
        leader = psutil.Process(int(pid_file.read_text().split()[0]))
        for proc in [leader, *leader.children(recursive=True)]:
            procs[proc.pid] = proc
    return list(procs.values())


def listeners(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                out.append((conn.laddr.ip, conn.laddr.port, f"{proc.pid} {name}"))
    return out


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def assert_only_loopback(home: Path, env: dict[str, str]) -> set[int]:
    tree = stack_tree(home)
    names = " ".join(p.name() for p in tree)
    for part in ("gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv", "ray::ProxyActor", "dagster"):
        assert part in names, f"{part} is not in the stack's process tree: {names}"
    # everything the stack started (it all carries OCM_DEV_STACK) is in the tree the test inspects
    tree_pids = {p.pid for p in tree}
    marked = [p for p in processes_of(home) if p.pid not in tree_pids]
    assert not marked, f"processes of the stack outside its process tree: {marked}"

    found = listeners(tree)
    ports = {port for _, port, _ in found}
    for var in PORT_VARS:
        assert int(env[var]) in ports, f"nothing listens on {var}={env[var]}: {sorted(found)}"
    assert len(found) >= 15, found  # plus GCS-assigned ports of raylet, agents, actors, metrics servers
    exposed = [item for item in found if not is_loopback(item[0])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(map(str, exposed))
    return tree_pids


def test_dev_start_listens_on_loopback_only_and_stop_twice_leaves_nothing(stack):
    home, env = stack
    for cycle in (1, 2):
        started = start_stack(home, env)
        assert started.returncode == 0, started.stdout + started.stderr
        seen = assert_only_loopback(home, env) if cycle == 1 else {p.pid for p in stack_tree(home)}
        assert len(seen) > 10

        stopped = dev(env, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "ray-head: stopped" in stopped.stdout and "dagster-webserver: stopped" in stopped.stdout
        assert "nothing of this stack is left running" in stopped.stdout
        left = processes_of(home, seen)
        assert not left, f"cycle {cycle}: left after stop: {[' '.join(p.cmdline()) for p in left]}"
        assert not list((home / "run").glob("*.pid"))


def test_ray_up_refuses_a_foreign_process_on_its_port(stack):
    home, env = stack
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))  # the port the OS gives the squatter is the stack's Ray port
    squatter.listen()
    env["OCM_RAY_PORT"] = str(squatter.getsockname()[1])
    try:
        out = dev(env, "ray-up", timeout=60)
    finally:
        squatter.close()
    assert out.returncode != 0
    assert (f"127.0.0.1:{env['OCM_RAY_PORT']} (Ray GCS) is taken by another process: "
            f"{os.getpid()}") in out.stderr
    assert "OCM_RAY_PORT" in out.stderr
    assert not processes_of(home), "ray-up started something although it refused"


def test_start_refuses_stale_processes_of_an_earlier_session_and_stop_ends_them(stack):
    home, env = stack
    stale = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep(120)  # {home}"],
        env={**env, "OCM_DEV_STACK": str(home)}, start_new_session=True,
    )
    try:
        out = dev(env, "start", timeout=60)
        assert out.returncode != 0
        assert "processes of an earlier ocm session" in out.stderr and f"{stale.pid} " in out.stderr
        assert [p.pid for p in processes_of(home)] == [stale.pid], "start ran beside a stale process"

        stopped = dev(env, "stop", timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "outside the recorded sessions" in stopped.stdout and str(stale.pid) in stopped.stdout
        assert stale.wait(timeout=10) == -signal.SIGTERM
    finally:
        if stale.poll() is None:
            stale.kill()


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
     ("192.0.2.2", False), ("::ffff:192.0.2.2", False)],
)
def test_the_loopback_check_tells_wildcard_and_interface_addresses_apart(ip, loopback):
    assert is_loopback(ip) is loopback

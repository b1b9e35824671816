"""The in-process Ray head that ocm starts (RayHead in-process, the tests' `init_local_ray`) listens on
127.0.0.1 only, Serve HTTP on it too, and ocm refuses to start one with token authentication off.

The head runs in a child process of its own, so that the test sees exactly that head's process tree (the
driver, its gcs_server, raylet, agents and workers) whatever Ray the pytest process may hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.ports import os_ports
from tests.test_dev_stack import is_loopback, listeners

ROOT = Path(__file__).resolve().parent.parent

HEAD = """
import json, sys, time
from tests.conftest import init_local_ray
from ocm_resources.env import serve_host
ray = init_local_ray()
from ray import serve
serve.start(http_options={"host": serve_host("local"), "port": int(sys.argv[1])})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address}), flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ENABLE", "RAY_AUTH"))}
    env.update(OCM_ENV="local", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _names(procs: list[psutil.Process]) -> list[str]:
    """The names of the processes still alive (Ray's short-lived workers may end between listing and
    reading)."""
    names = []
    for proc in procs:
        try:
            names.append(proc.name())
        except psutil.NoSuchProcess:
            continue
    return names


def test_in_process_head_listens_on_loopback_only(tmp_path):
    (serve_port,) = os_ports(1)
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD, str(serve_port)], cwd=ROOT, env=_env(), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=open(tmp_path / "head.err", "w"), text=True,
    )
    try:
        line = head.stdout.readline()
        assert line, (tmp_path / "head.err").read_text()[-3000:]
        assert json.loads(line)["gcs"].startswith("127.0.0.1:")
        driver = psutil.Process(head.pid)
        # HAProxy, the ingress (#14), binds the Serve port a moment after serve.start returns, from a process
        # of its own: wait for that listener in the head's tree, then look at everything the tree listens on
        deadline = time.monotonic() + 120
        while True:
            tree = [driver, *driver.children(recursive=True)]
            found = listeners(tree)
            if serve_port in {port for _, port, _ in found} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert serve_port in {port for _, port, _ in found}, found
        names = " ".join(_names(tree))
        for part in ("gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv", "ray::ProxyActor",
                     "haproxy"):
            assert part in names, names
        assert len(found) >= 8, found
        exposed = [item for item in found if not is_loopback(item[0])]
        assert not exposed, "listening beyond loopback:\n" + "\n".join(map(str, exposed))
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for proc in psutil.Process(head.pid).children(recursive=True):
                proc.kill()
            head.kill()


def test_refuses_to_start_a_head_with_token_auth_off():
    out = subprocess.run(
        [sys.executable, "-c", "from ocm_resources.ray import start_loopback_ray; start_loopback_ray()"],
        cwd=ROOT, env=_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "RAY_AUTH_MODE='disabled'" in out.stderr and "token" in out.stderr
    assert "Ray runtime started" not in out.stderr

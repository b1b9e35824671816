"""Process control of the embedded stack behind ``scripts/dev.sh start|stop|status|ray-up``.

Each service runs in its own session (``setsid``), started here with ``OCM_DEV_STACK=<OCM_HOME>`` in its
environment; its leader's PID and start time go to ``$OCM_HOME/run/<name>.pid``:

- ``ray-head``: ``ray start --head --block`` (the leader stays the parent of GCS, raylet, dashboard, monitor,
  log monitor and the Ray Client server; the raylet's agents and workers are its children), with Serve
  HTTP started on it;
- ``mlflow`` (the tracking server and UI), ``dagster-daemon``, ``dagster-webserver`` (and their code servers
  and run workers).

``stop`` ends, per service, the leader's process tree plus every process of its session (which keeps
processes whose parent died), then any process left that carries this stack's ``OCM_DEV_STACK``; SIGTERM
first, SIGKILL after a grace period (Ray's gcs_server and raylet ignore SIGTERM). It prints what it stopped
and what it could not. ``start`` refuses to run beside processes of an earlier session of this stack that
no recorded service owns, and beside a foreign process on one of its ports; it reuses a running head only
when that head is its own (recorded session, the GCS port held by a process of it, the address recorded in
its temp folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from ocm_resources.env import LOOPBACK, ConfigurationError, local_paths, local_ports, local_ray_environment

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
MARKER = "OCM_DEV_STACK"
SERVICES = ("ray-head", "mlflow", "dagster-daemon", "dagster-webserver")
TERM_GRACE_S = 15.0
KILL_GRACE_S = 3.0


def say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Stack:
    home: Path
    run: Path
    logs: Path
    ray_tmp: Path

    @classmethod
    def from_env(cls) -> Stack:
        paths = local_paths()
        stack = cls(paths.home, paths.home / "run", paths.home / "logs", paths.ray_temp)
        for d in (stack.run, stack.logs, stack.ray_tmp, paths.mlflow / "artifacts"):
            d.mkdir(parents=True, exist_ok=True)
        return stack

    # -- recorded sessions ----------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def record(self, name: str, pid: int) -> None:
        self.pid_file(name).write_text(f"{pid} {psutil.Process(pid).create_time()!r}\n")

    def leader(self, name: str) -> tuple[int, psutil.Process | None] | None:
        """(recorded pid, its process if it is still the one recorded) or None when nothing is recorded."""
        try:
            fields = self.pid_file(name).read_text().split()
            pid = int(fields[0])
            created = float(fields[1]) if len(fields) > 1 else None
        except (OSError, ValueError, IndexError):
            return None
        try:
            proc = psutil.Process(pid)
            if created is not None and abs(proc.create_time() - created) > 0.01:
                return pid, None  # the PID was reused by another process
            return pid, proc
        except psutil.NoSuchProcess:
            return pid, None

    def members(self, name: str) -> list[psutil.Process]:
        """The live processes of a recorded service: its leader's tree and the rest of its session."""
        found = self.leader(name)
        if found is None:
            return []
        sid, leader = found
        procs: dict[int, psutil.Process] = {}
        if leader is not None:
            procs[leader.pid] = leader
            for child in _safe(leader.children, recursive=True) or []:
                procs[child.pid] = child
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid and proc.pid not in procs:
                    procs[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        return [p for p in procs.values() if _alive(p)]

    def marked(self) -> list[psutil.Process]:
        """Live processes that carry this stack's OCM_DEV_STACK (everything a service started inherits it),
        this process and its ancestors excepted."""
        mine = {os.getpid(), *(p.pid for p in _safe(psutil.Process().parents) or [])}
        out = []
        for proc in psutil.process_iter():
            if proc.pid in mine:
                continue
            env = _safe(proc.environ)
            if env and env.get(MARKER) == str(self.home) and _alive(proc):
                out.append(proc)
        return out

    def owned(self) -> dict[str, list[psutil.Process]]:
        return {name: self.members(name) for name in SERVICES}


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (psutil.Error, OSError):
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(proc: psutil.Process) -> str:
    cmd = _safe(proc.cmdline) or [_safe(proc.name) or "?"]
    text = " ".join(cmd)
    return f"{proc.pid} {text[:140]}{'…' if len(text) > 140 else ''}"


def listener(port: int) -> psutil.Process | None:
    """The process that listens on TCP ``port`` (any address), if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return _safe(psutil.Process, conn.pid)
    return None


# -- starting -------------------------------------------------------------------------------------------


def service_env(stack: Stack, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(local_ray_environment())
    env[MARKER] = str(stack.home)
    env.update(extra)
    return env


def spawn(stack: Stack, name: str, cmd: list[str], **extra_env: str) -> psutil.Process:
    log = open(stack.logs / f"{name}.log", "ab")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env=service_env(stack, **extra_env), start_new_session=True,
    )
    log.close()
    stack.record(name, proc.pid)
    say(f"   {name} started (pid {proc.pid}), log {stack.logs / (name + '.log')}")
    return psutil.Process(proc.pid)


def check_port(port: int, what: str, variable: str, stack: Stack) -> None:
    holder = listener(port)
    if holder is None:
        return
    ours = {p.pid for procs in stack.owned().values() for p in procs}
    whose = "a process of this stack" if holder.pid in ours else "another process"
    raise SystemExit(
        f"!! {LOOPBACK}:{port} ({what}) is taken by {whose}: {describe(holder)}\n"
        f"   stop it, or choose another port with {variable}=…"
    )


def refuse_stale(stack: Stack) -> None:
    """Refuse to start beside processes of an earlier session of this stack that no running service owns."""
    owned = {p.pid for procs in stack.owned().values() for p in procs}
    stale = [p for p in stack.marked() if p.pid not in owned]
    if stale:
        lines = "\n".join(f"     {describe(p)}" for p in stale)
        raise SystemExit(
            f"!! processes of an earlier ocm session (OCM_HOME={stack.home}) still run:\n{lines}\n"
            "   end them with `make stop` (scripts/dev.sh stop), then start again"
        )


def recorded_head_address(stack: Stack) -> str | None:
    try:
        return (stack.ray_tmp / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def own_head(stack: Stack) -> str | None:
    """Why the recorded Ray head is not this stack's live head, or None when it is."""
    ports = local_ports()
    procs = stack.members("ray-head")
    if not procs:
        return "no recorded Ray head runs"
    expected = f"{LOOPBACK}:{ports.ray}"
    address = recorded_head_address(stack)
    if address != expected:
        return f"{stack.ray_tmp}/ray_current_cluster names {address!r}, not {expected}"
    holder = listener(ports.ray)
    if holder is None or holder.pid not in {p.pid for p in procs}:
        return (f"port {ports.ray} is not held by the recorded head's session "
                f"({describe(holder) if holder else 'nobody'})")
    return None


def wait_for_head(stack: Stack, leader: psutil.Process, log: Path, offset: int,
                  timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_bytes()[offset:].decode(errors="replace")
        if "Ray runtime started" in text and own_head(stack) is None:
            return
        if not _alive(leader):
            raise SystemExit(f"!! the Ray head exited while starting:\n{text[-3000:]}")
        time.sleep(0.5)
    raise SystemExit(f"!! the Ray head did not start within {timeout:.0f} s (log {log})")


def ensure_ray_token() -> None:
    """`ray start --head` turns token auth on only when a token exists: make sure one does."""
    if os.environ.get("RAY_AUTH_TOKEN") or (
        os.environ.get("RAY_AUTH_TOKEN_PATH") and Path(os.environ["RAY_AUTH_TOKEN_PATH"]).is_file()
    ):
        return
    subprocess.run([str(VENV / "bin" / "ray"), "get-auth-token", "--generate"], check=True,
                   stdout=subprocess.DEVNULL)


def ray_up(stack: Stack) -> None:
    ports = local_ports()
    if stack.members("ray-head"):
        problem = own_head(stack)
        if problem:
            raise SystemExit(f"!! the recorded Ray head is not usable: {problem}; run `make stop` first")
        say(f"   ray head already running ({LOOPBACK}:{ports.ray})")
    else:
        refuse_stale(stack)
        for port, what, var in (
            (ports.ray, "Ray GCS", "OCM_RAY_PORT"),
            (ports.ray_client, "Ray Client server", "OCM_RAY_CLIENT_PORT"),
            (ports.ray_dashboard, "Ray dashboard", "OCM_RAY_DASHBOARD_PORT"),
            (ports.ray_agent, "Ray dashboard agent", "OCM_RAY_AGENT_PORT"),
            (ports.serve, "Serve HTTP", "OCM_SERVE_PORT"),
            (ports.ray_metrics, "Ray metrics export (Prometheus)", "OCM_RAY_METRICS_PORT"),
        ):
            check_port(port, what, var, stack)
        ensure_ray_token()
        (stack.ray_tmp / "ray_current_cluster").unlink(missing_ok=True)
        log = stack.logs / "ray-head.log"
        offset = log.stat().st_size if log.exists() else 0
        # Serve's ingress (HAProxy on the Serve port in front of the replicas' direct-ingress ports,
        # ocm_resources.env.serve_ingress_environment) must be in the head's environment before it starts.
        # RAY_ADDRESS in the head's environment pins Ray's own helper processes (e.g. Train's placement-group
        # cleaner) to this cluster when other Ray instances run on the machine. Idle worker processes are
        # kept a minute (Ray: 1 s), so each training epoch's data read starts warm (IDLE_WORKER_KEEP_MS).
        leader = spawn(
            stack, "ray-head",
            [str(VENV / "bin" / "ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
             f"--port={ports.ray}", f"--ray-client-server-port={ports.ray_client}",
             f"--dashboard-host={LOOPBACK}", f"--dashboard-port={ports.ray_dashboard}",
             f"--dashboard-agent-listen-port={ports.ray_agent}", "--include-dashboard=true",
             f"--metrics-export-port={ports.ray_metrics}",  # Serve's request metrics, docs/monitoring.md
             f"--num-cpus={os.environ.get('OCM_RAY_CPUS', '4')}", f"--object-store-memory={1024**3}",
             f"--temp-dir={stack.ray_tmp}", "--disable-usage-stats"],
            RAY_ADDRESS=f"{LOOPBACK}:{ports.ray}",
            RAY_SERVE_THROUGHPUT_OPTIMIZED=os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1"),
            RAY_idle_worker_killing_time_threshold_ms=os.environ.get(
                "RAY_idle_worker_killing_time_threshold_ms", "60000"),
        )
        wait_for_head(stack, leader, log, offset)
        say(f"   ray head up ({LOOPBACK}:{ports.ray}, dashboard http://{LOOPBACK}:{ports.ray_dashboard})")
    with open(stack.logs / "ray-head.log", "ab") as log:
        done = subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "ocm_resources.serve_control", "start-http",
             "--host", LOOPBACK, "--port", str(ports.serve)],
            env=service_env(stack, RAY_ADDRESS=f"{LOOPBACK}:{ports.ray}"), stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if done.returncode != 0:
        raise SystemExit(f"!! Serve HTTP did not start on {LOOPBACK}:{ports.serve} "
                         f"(see {stack.logs}/ray-head.log)")
    say(f"   Serve HTTP on http://{LOOPBACK}:{ports.serve}")


def wait_http(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(1)
    say(f"!! {url} did not answer within {seconds:.0f} s")
    return False


def start(stack: Stack) -> None:
    ports = local_ports()
    say(f">> starting the embedded stack (OCM_HOME={stack.home})")
    ray_up(stack)
    workspace = str(ROOT / "workspace.yaml")
    services = {
        "mlflow": (
            [str(VENV / "bin" / "mlflow"), "server", "--host", LOOPBACK, "--port", str(ports.mlflow),
             "--backend-store-uri", f"sqlite:///{stack.home}/mlflow/mlflow.db",
             "--default-artifact-root", f"{stack.home}/mlflow/artifacts"],
            (ports.mlflow, "MLflow", "OCM_MLFLOW_PORT"),
        ),
        "dagster-daemon": ([str(VENV / "bin" / "dagster-daemon"), "run", "-w", workspace], None),
        "dagster-webserver": (
            [str(VENV / "bin" / "dagster-webserver"), "-w", workspace, "-h", LOOPBACK,
             "-p", str(ports.dagster)],
            (ports.dagster, "Dagster webserver", "OCM_DAGSTER_PORT"),
        ),
    }
    for name, (cmd, port) in services.items():
        if stack.members(name):
            say(f"   {name} already running (pid {stack.leader(name)[0]})")
            continue
        if port:
            check_port(*port, stack)
        spawn(stack, name, cmd)
    wait_http(f"http://{LOOPBACK}:{ports.mlflow}/health", 90)
    wait_http(f"http://{LOOPBACK}:{ports.dagster}/server_info", 120)
    say(f"""
   Dagster UI       http://{LOOPBACK}:{ports.dagster}   (lineage: Assets -> Global asset lineage)
   MLflow UI        http://{LOOPBACK}:{ports.mlflow}
   Ray dashboard    http://{LOOPBACK}:{ports.ray_dashboard}   (token: ~/.ray/auth_token)
   Serve endpoints  http://{LOOPBACK}:{ports.serve}/fashion_mnist/  http://{LOOPBACK}:{ports.serve}/tweet_sentiment/
   Stop everything: make stop""")


# -- stopping -------------------------------------------------------------------------------------------


def terminate(procs: list[psutil.Process], first: psutil.Process | None = None) -> list[psutil.Process]:
    """SIGTERM (``first`` alone first, so it can shut its children down), then SIGKILL what is left;
    returns the processes still alive after that."""
    procs = [p for p in procs if _alive(p)]
    if first is not None and _alive(first):
        _safe(first.send_signal, signal.SIGTERM)
        psutil.wait_procs([first], timeout=TERM_GRACE_S)
    left = [p for p in procs if _alive(p)]
    for p in left:
        _safe(p.send_signal, signal.SIGTERM)
    _, left = psutil.wait_procs(left, timeout=KILL_GRACE_S)
    left = [p for p in left if _alive(p)]
    for p in left:
        _safe(p.send_signal, signal.SIGKILL)
    _, left = psutil.wait_procs(left, timeout=KILL_GRACE_S)
    return [p for p in left if _alive(p)]


def stop(stack: Stack) -> int:
    say(f">> stopping the embedded stack (OCM_HOME={stack.home})")
    failed: list[str] = []
    for name in reversed(SERVICES):
        found = stack.leader(name)
        procs = stack.members(name)
        if not procs:
            if found is not None:
                say(f"   {name}: not running")
            stack.pid_file(name).unlink(missing_ok=True)
            continue
        names = {p.pid: (_safe(p.name) or "?") for p in procs}
        left = terminate(procs, first=found[1] if found else None)
        stopped = [f"{pid} {n}" for pid, n in names.items() if pid not in {p.pid for p in left}]
        say(f"   {name}: stopped {len(stopped)} process(es): {', '.join(stopped)}")
        for p in left:
            failed.append(f"{name}: {describe(p)}")
        if not left:
            stack.pid_file(name).unlink(missing_ok=True)
    strays = stack.marked()
    if strays:
        names = {p.pid: describe(p) for p in strays}
        left = terminate(strays)
        gone = [names[pid] for pid in names if pid not in {p.pid for p in left}]
        say(f"   outside the recorded sessions, stopped {len(gone)} process(es) of this stack:")
        for line in gone:
            say(f"     {line}")
        failed += [f"(no session): {describe(p)}" for p in left]
    (stack.ray_tmp / "ray_current_cluster").unlink(missing_ok=True)
    if failed:
        say("!! could not stop:")
        for line in failed:
            say(f"     {line}")
        return 1
    say("   nothing of this stack is left running")
    return 0


def status(stack: Stack) -> int:
    owned = stack.owned()
    for name, procs in owned.items():
        found = stack.leader(name)
        if procs:
            say(f"{name}: running (session {found[0] if found else '?'}, {len(procs)} processes)")
        else:
            say(f"{name}: stopped")
    ours = {p.pid for procs in owned.values() for p in procs}
    for p in stack.marked():
        if p.pid not in ours:
            say(f"stale: {describe(p)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "start"
    try:
        stack = Stack.from_env()
        if command == "start":
            start(stack)
        elif command == "ray-up":
            ray_up(stack)
        elif command == "stop":
            return stop(stack)
        elif command == "status":
            return status(stack)
        else:
            print("usage: scripts/dev.sh start|stop|status|ray-up", file=sys.stderr)
            return 2
    except ConfigurationError as exc:
        print(f"!! {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

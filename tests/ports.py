"""Ports for the tests' servers, in one place.

A port a test picks with bind(0) and close is only a guess: another process may bind it before the test's
server does (under a shuffled full-suite run, another test's Ray head does). The port is confirmed when the
server binds it. So a test starts its servers through :func:`on_free_ports`: fresh ports from the OS
(:func:`os_ports`), and when the server reports a bind failure (:func:`raise_if_taken` raises
:class:`PortTaken`), the start is retried on new ports instead of failing the test."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"

#: What the tests' servers print when their port is taken (checked against Ray 2.60, moto/werkzeug,
#: uvicorn, gunicorn, HAProxy and scripts/devstack.py):
#: - ``Address already in use`` (strerror of EADDRINUSE: Ray's GCS and raylet through gRPC, HAProxy's
#:   "cannot bind socket (Address already in use)", werkzeug) and asyncio's lower-case
#:   ``address already in use`` (uvicorn: MLflow, the Dagster webserver, the Ray dashboard agent);
#: - ``Failed to bind to`` (Ray: the dashboard "Failed to bind to 127.0.0.1:P because it's already
#:   occupied", the Ray Client server "Failed to bind to address", the dashboard agent "Failed to bind to
#:   port", Serve's Python proxy "Failed to bind to address");
#: - ``Port P is in use by another program`` (werkzeug: moto's server), ``Connection in use`` (gunicorn),
#:   ``cannot bind socket`` (HAProxy);
#: - ``is taken by another process`` (scripts/devstack.py before it starts a service).
IN_USE = re.compile(
    r"address (?:already )?in use|failed to bind to|is in use by another program|connection in use"
    r"|cannot bind socket|is taken by another process",
    re.IGNORECASE,
)

#: Sockets that keep :func:`closed_port`'s ports bound (and not listening) for the life of the process.
_HELD: list[socket.socket] = []


class PortTaken(RuntimeError):
    """A server of the test could not bind a port it was given: another process took it first."""


def os_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports from the OS: ``n`` sockets bound to 127.0.0.1:0, held open together (so
    the OS cannot hand one port out twice), then closed for the test's servers to bind."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def closed_port() -> int:
    """A loopback port with nothing listening, for "connection refused" tests. The port stays bound (without
    listen) by this process until it exits: a connection to it is refused, and no other process can start
    listening on it meanwhile."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


def raise_if_taken(log_text: str, what: str, ports: Iterable[int] | None = None) -> None:
    """Raise :class:`PortTaken` when ``log_text`` (the output of ``what``) shows a bind failure; with
    ``ports``, only a failure whose line names one of them: Ray's dashboard and autoscaler log every failed
    bind of their own fixed metrics ports (44227, 44217) while a healthy head runs beside another Ray, and
    those are not the test's ports. A bind failure that names no port (a bare traceback) is not counted."""
    wanted = re.compile(r"(?<!\d)(?:" + "|".join(map(str, ports)) + r")(?!\d)") if ports else None
    source = ""
    for line in log_text.splitlines():
        if line.startswith("== "):  # a file's header in logs_of's text
            source = f" ({line[3:].strip()})"
            continue
        if IN_USE.search(line) and (wanted is None or wanted.search(line)):
            raise PortTaken(f"{what} could not bind a port it was given{source}: {line.strip()[:500]}")


def on_free_ports(n: int, start: Callable[[list[int]], T], attempts: int = 3) -> T:
    """``start(ports)`` with ``n`` fresh :func:`os_ports`; what it returns. When it raises :class:`PortTaken`
    (another process bound one of the ports first) it runs again on new ports, up to ``attempts`` times in
    all; ``start`` must have stopped whatever it started before it raises."""
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        ports = os_ports(n)
        try:
            return start(ports)
        except PortTaken as exc:
            failures.append(f"attempt {attempt} on ports {ports}: {exc}")
            last = exc
    raise PortTaken(
        f"lost the race for its ports {attempts} times in a row (each time another process bound one of "
        "the ports the OS had just handed out):\n  " + "\n  ".join(failures)
    ) from last


def logs_of(*paths: Path | str, offsets: dict[Path, int] | None = None) -> str:
    """The text of log files: each path a file or a folder (every file under it, e.g. a Ray session's
    ``logs``); ``offsets`` ({file: size}) skips what a file held before (a log appended to across starts)."""
    parts = []
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                data = file.read_bytes()[(offsets or {}).get(file, 0):]
            except OSError:
                continue
            parts.append(f"== {file}\n{data.decode(errors='replace')}")
    return "\n".join(parts)

"""tests/ports.py: a start that loses the race for its ports runs again on new ones, a bind failure in a
server's log is told apart from other output, and a closed port refuses connections."""

from __future__ import annotations

import socket

import pytest

from tests.ports import PortTaken, closed_port, on_free_ports, os_ports, raise_if_taken


def test_os_ports_are_distinct_loopback_ports():
    ports = os_ports(8)
    assert len(set(ports)) == 8 and all(0 < port < 65536 for port in ports)


def test_a_start_that_finds_its_port_taken_runs_again_on_new_ports():
    calls: list[list[int]] = []

    def start(ports: list[int]) -> str:
        calls.append(ports)
        if len(calls) == 1:
            raise PortTaken("the server could not bind a port it was given")
        return f"up on {ports}"

    assert on_free_ports(3, start) == f"up on {calls[1]}"
    assert len(calls) == 2 and all(len(ports) == 3 for ports in calls)


def test_a_start_that_always_finds_its_port_taken_fails_after_its_attempts():
    calls: list[list[int]] = []

    def start(ports: list[int]) -> None:
        calls.append(ports)
        raise PortTaken(f"moto could not bind {ports[0]}")

    with pytest.raises(PortTaken, match="lost the race for its ports 4 times") as failed:
        on_free_ports(1, start, attempts=4)
    assert len(calls) == 4
    message = str(failed.value)
    for attempt, ports in enumerate(calls, 1):
        assert f"attempt {attempt} on ports {ports}: moto could not bind {ports[0]}" in message
    assert isinstance(failed.value.__cause__, PortTaken)


def test_other_failures_of_a_start_are_not_retried():
    calls = []

    def start(ports: list[int]) -> None:
        calls.append(ports)
        raise AssertionError("the server exited: bad configuration")

    with pytest.raises(AssertionError, match="bad configuration"):
        on_free_ports(2, start)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "line",
    [
        # Ray's GCS (gRPC), the Ray Client server, the dashboard and its agent (Ray 2.60)
        "E1207 add_port.cc:83] Failed to add port to server: (Error in bind for address '0.0.0.0:48529': "
        "Address already in use)",
        "RuntimeError: Failed to bind to address 127.0.0.1:52961; set GRPC_VERBOSITY=debug",
        "ValueError: Failed to bind to 127.0.0.1:34999 because it's already occupied.",
        "ERROR agent.py:233 -- Failed to start HTTP server with exception: [Errno 98] error while attempting "
        "to bind on address ('127.0.0.1', 55931): address already in use.",
        # moto (werkzeug), gunicorn, HAProxy, scripts/devstack.py
        "Port 43121 is in use by another program. Either identify and stop that program",
        "[ERROR] Connection in use: ('127.0.0.1', 5000)",
        "[ALERT] Starting frontend http: cannot bind socket (Address already in use) [127.0.0.1:8000]",
        "!! 127.0.0.1:6379 (Ray GCS) is taken by another process: 4242 python -m http.server",
    ],
)
def test_raise_if_taken_recognises_the_servers_bind_failures(line):
    log = f"starting\n{line}\nexiting\n"
    with pytest.raises(PortTaken, match="the server could not bind a port it was given") as taken:
        raise_if_taken(log, "the server")
    assert line.strip() in str(taken.value) and "exiting" not in str(taken.value)


def test_raise_if_taken_counts_only_the_ports_it_is_given_and_names_the_log():
    ray_logs = (
        "== /tmp/h/session_latest/logs/dashboard.log\nStarting dashboard metrics server on port 44227\n"
        "OSError: [Errno 98] Address already in use\n"  # Ray's own fixed port, while another Ray runs
        "== /tmp/h/session_latest/logs/dashboard_agent.log\n"
        "ERROR http_server_agent.py:85 -- Agent port #155931 failed: Failed to bind to port 155931\n"
    )
    raise_if_taken(ray_logs, "a Ray node", [55931, 44])
    ray_logs += "WARNING Failed to bind to port 55931 (attempt 6/6): address already in use\n"
    with pytest.raises(PortTaken) as taken:
        raise_if_taken(ray_logs, "a Ray node", [55931, 44])
    assert str(taken.value) == (
        "a Ray node could not bind a port it was given (/tmp/h/session_latest/logs/dashboard_agent.log): "
        "WARNING Failed to bind to port 55931 (attempt 6/6): address already in use"
    )


def test_raise_if_taken_ignores_other_output():
    raise_if_taken(
        "Ray runtime started.\n- bytes in use: 0\n- objects in use: 0\nFailed to bind/attach metrics dgram "
        "reader\nRuntimeError: Failed to start GCS\n",
        "the Ray head",
    )


def test_a_closed_port_refuses_connections_and_stays_closed():
    port = closed_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    with socket.socket() as other, pytest.raises(OSError):  # nobody else can start listening on it
        other.bind(("127.0.0.1", port))
    assert closed_port() != port

"""Process lifecycle: restarts, graceful shutdown, a user arriving before any client."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from e2e_support import SHUTDOWN_TIMEOUT_S, TCP_ESTABLISHED, Tunnel, connect, echo_probe, recv_exact, tcp_sockets, \
    wait_for


def test_client_reconnects_after_server_is_killed_and_restarted(procs, nodepass_bin, echo_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start()
    assert echo_probe(tunnel.host, tunnel.target_port, timeout=10)
    client_pid = tunnel.client.pid

    tunnel.kill_server()
    # The client sees its control connection go away (no established connection to the tunnel port).
    wait_for(lambda: all(s.remote_port != tunnel.tunnel_port or s.state != TCP_ESTABLISHED
                         for s in tcp_sockets(client_pid)), 10, "the client to notice the dead server")
    assert tunnel.client.alive(), f"client exited ({tunnel.client.returncode()}) when the server died"

    started = time.monotonic()
    tunnel.start_server(timeout=20)
    remaining = lambda: max(1.0, 20 - (time.monotonic() - started))  # noqa: E731
    tunnel.wait_client_connected(remaining())
    tunnel.wait_ready(remaining())
    print(f"client reconnected and carried traffic {time.monotonic() - started:.1f}s after the server restart")

    assert tunnel.client.alive() and tunnel.client.pid == client_pid, "the same client process must reconnect"
    for _ in range(3):
        assert echo_probe(tunnel.host, tunnel.target_port, timeout=10)


@pytest.mark.parametrize("role", ["server", "client"])
def test_sigterm_with_live_session_exits_zero(procs, nodepass_bin, echo_service, role):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start()
    with connect(tunnel.host, tunnel.target_port, timeout=10) as user:
        user.sendall(b"hello before shutdown\n")
        assert recv_exact(user, 22) == b"hello before shutdown\n"

        proc = tunnel.server if role == "server" else tunnel.client
        bound = SHUTDOWN_TIMEOUT_S + 2
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{role} still running {bound:.0f}s after SIGTERM with a live session "
                        f"(SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S:.0f}s)")
        elapsed = time.monotonic() - started
        assert rc == 0, f"{role} exited with code {rc} after SIGTERM"
        print(f"{role} exited 0 {elapsed:.2f}s after SIGTERM")


@pytest.mark.ours_only
def test_user_before_client_is_closed_and_server_survives(procs, nodepass_bin, echo_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start_server()
    # A user arrives while no client (so no pool connection) exists.
    started = time.monotonic()
    try:
        user = connect(tunnel.host, tunnel.target_port, timeout=15)
    except ConnectionRefusedError:
        user = None  # not listening on TARGET before a client exists: acceptable, nothing to hang
    if user is not None:
        with user:
            try:
                user.sendall(b"anyone there?\n")
                data = user.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except socket.timeout:
                pytest.fail("the server kept a user connection open for 15s with no client to serve it")
        assert data == b"", f"user got {data!r} although no client exists"
        print(f"user connection closed by the server after {time.monotonic() - started:.1f}s")
    assert tunnel.server.alive(), f"server died ({tunnel.server.returncode()}) after a user came before any client"

    tunnel.start_client()
    tunnel.wait_client_connected(20)
    tunnel.wait_ready(20)
    assert echo_probe(tunnel.host, tunnel.target_port, timeout=10)


@pytest.mark.ours_only
def test_client_started_before_the_server_connects_once_it_exists(procs, nodepass_bin, echo_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start_client()
    wait_for(lambda: "cannot connect to the server" in tunnel.client.output(), 10, "client's first failed attempt")
    tunnel.start_server()
    # The next attempt comes after SERVICE_COOLDOWN (500 ms here); allow a few more for slow machines.
    tunnel.wait_client_connected(10)
    tunnel.wait_ready(10)
    assert "np.retry=500ms" in tunnel.client.output()

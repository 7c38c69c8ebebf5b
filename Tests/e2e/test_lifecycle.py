"""Process lifecycle: restarts, graceful shutdown, a user arriving before any client."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

import pytest

from support.probes import echo_probe
from support.procfs import TCP_ESTABLISHED, tcp_sockets
from support.sockets import connect, recv_exact
from support.tunnel import SHUTDOWN_TIMEOUT_S, Tunnel
from support.waiting import wait_for


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
    wait_for(lambda: "cannot reach the server at" in tunnel.client.output(), 10, "client's first failed attempt")
    tunnel.start_server()
    # The next attempt comes after SERVICE_COOLDOWN (500 ms here); allow a few more for slow machines.
    tunnel.wait_client_connected(10)
    tunnel.wait_ready(10)
    assert "np.retry=500ms" in tunnel.client.output()


class _SwitchableRelay:
    """A TCP relay for the control channel that can start swallowing every byte while keeping both
    sockets open (a half-open path): connections accepted afterwards are relayed normally again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropping: set = set()
        self.sockets: list = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
            pair = (downstream, upstream)
            with self.lock:
                self.sockets.extend(pair)
            for a, b in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                drop = id(pair[0]) in self.dropping
            if not drop:
                try:
                    dst.sendall(data)
                except OSError:
                    return

    def go_silent(self) -> None:
        """Every connection open now keeps its sockets but forwards nothing more, in both directions."""
        with self.lock:
            self.dropping.update(id(s) for s in self.sockets[0::2])

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                s.close()


@pytest.mark.ours_only
def test_client_detects_a_silent_control_channel_and_recovers(procs, nodepass_bin, echo_service):
    """A half-open control path (both sockets open, no byte gets through) is noticed by the client within
    3 x REPORT_INTERVAL (1 s here) plus one check period, and the client reconnects and carries traffic."""
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start_server()
    relay = _SwitchableRelay(tunnel.tunnel_port)
    try:
        client_url = (f"client://127.0.0.1:{relay.port}/127.0.0.1:{echo_service.port}?log=debug")
        tunnel.client = procs.start("client", [nodepass_bin, client_url], env=tunnel.client_env)
        wait_for(lambda: "pool port announced" in tunnel.client.output(), 10, "client connected through the relay")
        tunnel.wait_ready(10)
        relay.go_silent()
        silenced = time.monotonic()
        wait_for(lambda: "no heartbeat from the server" in tunnel.client.output(), 10, "client noticing the silence")
        noticed = time.monotonic() - silenced
        assert noticed <= 3 * 1.0 + 1.0 + 1.0, f"noticed after {noticed:.1f}s"
        wait_for(lambda: tunnel.client.output().count("pool port announced") >= 2, 10, "client reconnected")
        tunnel.wait_ready(10)
    finally:
        relay.close()


@pytest.mark.ours_only
def test_both_sides_detect_a_silent_v2_control_channel_and_recover(procs, nodepass_bin, echo_service):
    """With v2 both sides send heartbeats, so the server too notices a half-open control path (the relay
    keeps both sockets open and ACKs everything, so TCP alone never tells): each side within
    3 x REPORT_INTERVAL (1 s here) plus one check period; the client then reconnects and carries traffic."""
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port).use_key("half-open-" + "k" * 16)
    tunnel.start_server()
    relay = _SwitchableRelay(tunnel.tunnel_port)
    try:
        client_url = f"client://{tunnel.client_key}@127.0.0.1:{relay.port}/127.0.0.1:{echo_service.port}?log=debug"
        tunnel.client = procs.start("client", [nodepass_bin, client_url], env=tunnel.client_env)
        wait_for(lambda: "authenticated" in tunnel.client.output(), 10, "client connected through the relay")
        tunnel.wait_ready(10)
        relay.go_silent()
        silenced = time.monotonic()
        for proc, role in ((tunnel.server, "server"), (tunnel.client, "client")):
            wait_for(lambda: "no heartbeat from the peer" in proc.output(), 10, f"the {role} noticing the silence")
            noticed = time.monotonic() - silenced
            assert noticed <= 3 * 1.0 + 1.0 + 1.0, f"{role} noticed after {noticed:.1f}s"
        wait_for(lambda: "np.clients=0" in tunnel.server.output(), 5, "the server dropping the silent client")
        wait_for(lambda: tunnel.server.output().count("client authenticated") >= 2, 10, "client reconnected")
        tunnel.wait_ready(10)
    finally:
        relay.close()

"""Resumable relays (the server's resume=1, nodepass/2.3) against the built binary: relays that outlive
their pool connection, killed with `ss -K` in the middle of a transfer; the grace period; a server that
dies. docs/PROTOCOL.md describes the exchange."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from support.certs import self_signed
from support.ports import free_port
from support.procfs import TCP_ESTABLISHED, tcp_sockets
from support.sockets import connect, recv_exact
from support.tunnel import Tunnel, pool_port
from support.waiting import wait_for
from scenarios import integrity
import v2_peer

pytestmark = pytest.mark.ours_only

KEY = "e2e-resume-" + secrets.token_hex(12)


def resume_tunnel(procs, nodepass_bin, service_port, tls=None, mode=None, grace=None) -> Tunnel:
    env = {"RESUME_GRACE": grace} if grace else None
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, service_port, env=env).use_key(KEY)
    tunnel.server_query = "&resume=1" + (f"&tls={tls}" if tls else "") + (f"&mode={mode}" if mode else "")
    return tunnel


def kill_sockets(port: int, side: str) -> None:
    """Destroys the TCP sockets whose destination (side "dport") or source ("sport") port is `port`; the
    kernel resets their peers."""
    subprocess.run(["ss", "-K", "state", "established", f"( {side} = :{port} )"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)


class Killer:
    """Kills the pool connections every `period` seconds, on the client's side and the server's in turn."""

    def __init__(self, port: int, period: float):
        self.port = port
        self.period = period
        self.kills = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="killer", daemon=True)

    def run(self) -> None:
        while not self.done.wait(self.period):
            kill_sockets(self.port, "dport" if self.kills % 2 == 0 else "sport")
            self.kills += 1

    def __enter__(self) -> "Killer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(15)


@pytest.fixture(autouse=True)
def needs_ss():
    if shutil.which("ss") is None:
        pytest.skip("ss not installed (Debian package: iproute2)")


def resumed(proc) -> int:
    return proc.output().count("relay resumed")


@pytest.mark.parametrize("tls,mode,mib", [(None, None, 1024), ("0", None, 256), ("2", None, 256),
                                          (None, "2", 256)])
def test_every_byte_arrives_once_while_pool_connections_are_killed_every_2s(procs, nodepass_bin, echo_service,
                                                                            tls, mode, mib, tmp_path):
    """A transfer each way (an echo), SHA-256 at the user's end, while every pool connection is killed every
    2 s: each break is resumed, nothing is lost, repeated or reordered."""
    if mode == "2":
        # Forward mode: users connect to the client's TARGET, the server dials the service.
        tunnel = resume_tunnel(procs, nodepass_bin, free_port(), tls=tls, mode=mode)
        user_port = tunnel.service_port
        tunnel.target_port = echo_service.port
        tunnel.start_server()
        tunnel.start_client()
        wait_for(lambda: "forward mode: users connect" in tunnel.client.output(), 10, "the client's listener")
        tunnel.target_port = user_port
        tunnel.wait_ready(20)
    else:
        tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port, tls=tls, mode=mode)
        if tls == "2":
            crt, key = self_signed(tmp_path, "data", "nodepass-e2e-data")
            tunnel.server_query += f"&crt={crt}&key={key}"
        tunnel.start()
    with Killer(pool_port(tunnel), 2.0) as killer:
        integrity(tunnel, streams=1, mib_per_stream=mib, deadline_s=200)
    assert killer.kills >= 1, "the transfer ended before the first kill: nothing was tested"
    for proc in (tunnel.server, tunnel.client):
        assert resumed(proc) >= 1, f"{proc.name} never resumed"
        assert "did not come back" not in proc.output()
    # Resumes are logged with what was sent again; the user saw none of it.
    assert re.search(r"relay resumed .*np\.resume\.resent=\d+", tunnel.client.output())


def test_a_killed_control_channel_reconnects_and_every_relay_resumes(procs, nodepass_bin, echo_service):
    tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port).start()
    outcome = {}

    def transfer():
        try:
            integrity(tunnel, streams=2, mib_per_stream=128, deadline_s=120)
            outcome["ok"] = True
        except AssertionError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=transfer, daemon=True)
    thread.start()
    wait_for(lambda: tunnel.client.output().count("relaying (resumable)") >= 2, 30, "two relays")
    kill_sockets(tunnel.tunnel_port, "dport")
    thread.join(150)
    assert outcome.get("ok"), outcome.get("error", "the transfer did not end")
    output = tunnel.client.output()
    assert "connected to the server" in output.split("relaying (resumable)")[-1] or output.count(
        "connected to the server") >= 2, "the control channel did not reconnect"
    assert resumed(tunnel.client) >= 2, "each relay resumes after the reconnection"


def established(proc, port: int, local: bool) -> int:
    return sum(1 for s in tcp_sockets(proc.pid) if s.state == TCP_ESTABLISHED
               and (s.local_port if local else s.remote_port) == port)


def test_after_the_grace_period_both_ends_close_with_a_reason_and_nothing_is_left(procs, nodepass_bin,
                                                                               echo_service):
    """The server stops answering (SIGSTOP) while the relay's pool connection is killed: the client gives up
    after RESUME_GRACE and resets the service's connection; once the server runs again it does the same
    to the user. Neither side keeps a socket of the relay."""
    tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port, grace="2s").start()
    user = connect(tunnel.host, tunnel.target_port, timeout=30)
    user.sendall(b"before")
    assert recv_exact(user, 6) == b"before"
    assert established(tunnel.client, echo_service.port, local=False) == 1
    port = pool_port(tunnel)
    tunnel.server.signal(signal.SIGSTOP)
    try:
        kill_sockets(port, "dport")
        wait_for(lambda: "did not come back within RESUME_GRACE" in tunnel.client.output(), 20,
                 "the client's grace period to pass")
        wait_for(lambda: established(tunnel.client, echo_service.port, local=False) == 0, 10,
                 "the client to close the service's connection")
    finally:
        tunnel.server.signal(signal.SIGCONT)
    wait_for(lambda: "did not come back within RESUME_GRACE" in tunnel.server.output(), 20,
             "the server's grace period to pass")
    user.settimeout(10)
    with pytest.raises(ConnectionResetError):
        data = user.recv(10)
        assert data == b"", "nothing arrives after the grace period"
        raise AssertionError("the user's connection ended without a reset")
    user.close()
    wait_for(lambda: established(tunnel.server, tunnel.target_port, local=True) == 0, 10,
             "the server to drop the user's connection")
    # The tunnel still works for the next user.
    with connect(tunnel.host, tunnel.target_port, timeout=30) as again:
        again.sendall(b"after")
        assert recv_exact(again, 5) == b"after"


def test_a_server_killed_with_9_leaves_the_client_closing_the_service_connection(procs, nodepass_bin,
                                                                                echo_service):
    tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port, grace="3s").start()
    user = connect(tunnel.host, tunnel.target_port, timeout=30)
    user.sendall(b"ping")
    assert recv_exact(user, 4) == b"ping"
    tunnel.kill_server()
    wait_for(lambda: "did not come back within RESUME_GRACE" in tunnel.client.output(), 30,
             "the client's grace period to pass")
    wait_for(lambda: established(tunnel.client, echo_service.port, local=False) == 0, 10,
             "the client to close the service's connection")
    assert tunnel.client.alive()
    user.close()


def test_a_restarted_server_refuses_the_resume_and_the_client_closes_at_once(procs, nodepass_bin,
                                                                             echo_service):
    """The server restarts (kill -9, then the same URL): the client reconnects and asks to resume; the new
    server has no such relay and says so, and the client closes the service's connection before its grace
    period ends."""
    tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port, grace="60s").start()
    user = connect(tunnel.host, tunnel.target_port, timeout=30)
    user.sendall(b"ping")
    assert recv_exact(user, 4) == b"ping"
    tunnel.kill_server()
    user.close()
    started = time.monotonic()
    tunnel.start_server()
    wait_for(lambda: "the server no longer has it" in tunnel.client.output(), 40, "the refused resume")
    wait_for(lambda: established(tunnel.client, echo_service.port, local=False) == 0, 10,
             "the client to close the service's connection")
    assert time.monotonic() - started < 55, "closed by the refusal, not by the grace period"
    assert "resume refused: no such relay" in tunnel.server.output()
    tunnel.wait_ready(20)


def test_a_forged_or_replayed_resume_is_refused_logged_and_delivers_nothing(procs, nodepass_bin, echo_service):
    """An independent client (v2_peer, written from docs/PROTOCOL.md) negotiates nodepass/2.3, relays a user
    over frames, then loses its pool connection. A resume with the right relay ID but a wrong key, one for a
    relay that does not exist, and a replay of the genuine request on another connection are each answered
    `unknown` and closed; the genuine one resumes, the server sends again what was not acknowledged, and
    the user sees exactly the relayed bytes."""
    tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port, tls="0")
    tunnel.server_env["REPORT_INTERVAL"] = "30s"  # the Python client sends no heartbeats
    tunnel.start_server()
    control, session = v2_peer.handshake(tunnel.host, tunnel.tunnel_port, KEY, resume=True)
    assert control.alpn == v2_peer.ALPN_RESUME and session.resumes
    pool = v2_peer.PoolConnection(tunnel.host, session.pool_port)
    pool.answer(session)
    pool_id = struct.pack(">I", pool.finish(session))
    user = connect(tunnel.host, tunnel.target_port)
    user.sendall(b"question")
    while True:
        kind, payload = v2_peer.read_frame(control.sock)
        if kind == v2_peer.LAUNCH:
            assert payload == pool_id
            break
    assert v2_peer.read_resume_data(pool.sock) == b"question"
    pool.sock.sendall(v2_peer.data_frame(b"answer"))
    assert recv_exact(user, 6) == b"answer"
    relay_id = session.session_id + pool_id
    key = v2_peer.resume_key(session.secret, pool.nonce, pool_id)
    pool.close()  # the relay's pool connection breaks

    def resume_connection(request_for) -> tuple:
        connection = v2_peer.PoolConnection(tunnel.host, session.pool_port)
        connection.answer(session, resume=True)
        request = request_for(connection.nonce)
        connection.sock.sendall(request)
        return connection, request, recv_exact(connection.sock, 41)

    refused = bytes([1]) + bytes(40)
    forged, _, answer = resume_connection(lambda nonce: v2_peer.resume_request(os.urandom(32), relay_id, nonce, 0))
    assert answer == refused and forged.closed_by_server(5)
    unknown_id = session.session_id + os.urandom(4)
    stranger, _, answer = resume_connection(lambda nonce: v2_peer.resume_request(key, unknown_id, nonce, 0))
    assert answer == refused and stranger.closed_by_server(5)
    # The genuine resume, saying nothing was received: the server sends "question" again.
    good, request, answer = resume_connection(lambda nonce: v2_peer.resume_request(key, relay_id, nonce, 0))
    assert answer == v2_peer.resume_reply(key, relay_id, good.nonce, 6), "the server received 'answer' (6)"
    assert v2_peer.read_resume_data(good.sock) == b"question"
    replay = v2_peer.PoolConnection(tunnel.host, session.pool_port)
    replay.answer(session, resume=True)
    replay.sock.sendall(request)  # bound to the genuine connection's nonce
    assert recv_exact(replay.sock, 41) == refused and replay.closed_by_server(5)
    good.sock.sendall(v2_peer.data_frame(b" and more"))
    assert recv_exact(user, 9) == b" and more"
    user.settimeout(1)
    with pytest.raises(socket.timeout):
        user.recv(1)  # nothing else reached the user
    wait_for(lambda: "resume refused: its proof is not valid" in tunnel.server.output(), 5,
             "the server to log the forged resume")
    assert "relay resumed" in tunnel.server.output()
    user.close()
    good.close()
    control.close()


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/PID/status")


def test_ended_relays_leave_no_memory_behind(procs, nodepass_bin, echo_service):
    """3,000 short resumable relays, one after the other, after 300 to warm up: neither side's anonymous
    memory grows by more than 4 MiB (an earlier build kept every ended relay: about 4.7 KiB each, 14 MiB
    here)."""
    tunnel = resume_tunnel(procs, nodepass_bin, echo_service.port).start()

    def short_connections(count: int) -> None:
        for i in range(count):
            with connect(tunnel.host, tunnel.target_port, timeout=30) as user:
                message = f"short-{i}".encode()
                user.sendall(message)
                assert recv_exact(user, len(message)) == message

    short_connections(300)
    wait_for(lambda: established(tunnel.client, echo_service.port, local=False) == 0, 10, "the relays to end")
    before = {proc.name: rss_anon_kib(proc.pid) for proc in (tunnel.server, tunnel.client)}
    short_connections(3000)
    wait_for(lambda: established(tunnel.client, echo_service.port, local=False) == 0, 10, "the relays to end")
    for proc in (tunnel.server, tunnel.client):
        grown = rss_anon_kib(proc.pid) - before[proc.name]
        assert grown < 4096, f"{proc.name}: RssAnon grew by {grown} KiB over 3,000 ended relays"

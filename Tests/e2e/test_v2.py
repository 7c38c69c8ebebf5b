"""Protocol v2 (a key in the URL) against the built binary: traffic with each tls setting, and attacks that
must not get in. The attacker and the replaying client are v2_peer.py, an independent Python
implementation of docs/PROTOCOL.md."""

from __future__ import annotations

import os
import re
import secrets
import select
import shutil
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from support.certs import self_signed
from support.ports import free_port
from support.probes import echo_probe
from support.procfs import TCP_ESTABLISHED, tcp_sockets
from support.sockets import connect, recv_exact
from support.tunnel import Tunnel, pool_port
from support.waiting import wait_for
from scenarios import burst, integrity
import v2_peer

pytestmark = pytest.mark.ours_only

KEY = "e2e-" + secrets.token_hex(12)


def v2_tunnel(procs, nodepass_bin, service_port, tls=None, key=KEY) -> Tunnel:
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, service_port).use_key(key)
    if tls is not None:
        tunnel.server_query = f"&tls={tls}"
    return tunnel


def wait_log(proc, pattern: str, timeout: float, what: str) -> str:
    """Waits until proc's output matches pattern; returns the matching line."""

    def found():
        match = re.search(pattern, proc.output())
        return match.group(0) if match else None

    return wait_for(found, timeout, what)


@pytest.fixture(scope="module")
def data_cert(tmp_path_factory):
    """(crt, key) PEM files for tls=2: an ECDSA P-256 certificate made by openssl for this test run."""
    crt, key = self_signed(tmp_path_factory.mktemp("v2cert"), "data", "nodepass-e2e-data")
    return str(crt), str(key)


def assert_spliced(tunnel, expected: bool) -> None:
    """Plain relays move to the kernel (splice) on both sides; TLS ones never do."""
    for proc in (tunnel.server, tunnel.client):
        spliced = "relay moved to the kernel (splice)" in proc.output()
        assert spliced == expected, f"{proc.name}: spliced={spliced}, expected {expected}"


class Capture:
    """tcpdump on the loopback interface, to look at what crosses the wire."""

    def __init__(self, procs, tmp_path: Path, port: int):
        if shutil.which("tcpdump") is None:
            pytest.skip("tcpdump not installed (Debian package: tcpdump)")
        self.path = tmp_path / f"port-{port}.pcap"
        self.proc = procs.start("tcpdump", ["tcpdump", "-i", "lo", "-U", "-n", "-s", "0", "-w", str(self.path),
                                            f"tcp port {port}"])
        wait_log(self.proc, r"listening on lo", 10, "tcpdump to start")

    def bytes(self) -> bytes:
        self.proc.stop()
        return self.path.read_bytes()


# --------------------------------------------------------------------------- traffic


@pytest.mark.parametrize("tls", [None, "0", "1", "2"])
def test_v2_relays_intact_data_with_each_tls_setting(procs, nodepass_bin, echo_service, tls, data_cert, tmp_path):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port, tls)
    if tls == "2":
        tunnel.server_query += f"&crt={data_cert[0]}&key={data_cert[1]}"
    tunnel.start_server()
    capture = Capture(procs, tmp_path, pool_port(tunnel))
    tunnel.start_client()
    tunnel.wait_client_connected(10)
    tunnel.wait_ready(20)
    token = ("plaintext-marker-" + secrets.token_hex(16)).encode()
    with connect(tunnel.host, tunnel.target_port) as s:
        s.sendall(token)
        assert recv_exact(s, len(token)) == token
    integrity(tunnel, streams=4, mib_per_stream=4, deadline_s=60)
    wire = capture.bytes()
    expected_tls = "1" if tls is None else tls
    wait_log(tunnel.client, rf"authenticated .*np\.tls={expected_tls}", 5, "the client's tls setting")
    # tls=1 seals the pool connections with keys from the session (nodepass/2.2): no TLS handshake on them.
    protection = {"0": "none", "1": "sealed", "2": "tls"}[expected_tls]
    wait_log(tunnel.client, rf"np\.pool\.protection={protection}", 5, "how the pool connections are protected")
    client_hello = re.search(rb"\x16\x03[\x01\x03]..\x01\x00", wire, re.S)  # record header, ClientHello
    assert (client_hello is not None) == (expected_tls == "2"), "a TLS handshake crossed the pool port, or none did"
    if expected_tls == "0":
        assert token in wire, "tls=0 relays in clear: the marker should be visible on the pool port"
    else:
        assert token not in wire, f"tls={expected_tls}: user data crossed the pool port in clear"
    assert_spliced(tunnel, expected_tls == "0")
    assert KEY.encode() not in wire
    for proc in (tunnel.server, tunnel.client):
        assert KEY not in proc.output(), "the key appeared in a log"


@pytest.mark.parametrize("mode,tls", [("2", "1"), ("2", "0"), ("2", "2"), ("0", None)])
def test_forward_mode_users_connect_to_the_client_and_the_server_dials(procs, nodepass_bin, echo_service, mode, tls,
                                                                      data_cert):
    """mode=2, or mode=0 when the server cannot listen on its TARGET (here the echo service already does):
    the client listens on its TARGET and the server dials its own."""
    tunnel = v2_tunnel(procs, nodepass_bin, free_port(), tls)
    user_port = tunnel.service_port  # the client's TARGET: where users connect
    if mode != "0":
        tunnel.server_query += f"&mode={mode}"
    if tls == "2":
        tunnel.server_query += f"&crt={data_cert[0]}&key={data_cert[1]}"
    tunnel.target_port = echo_service.port  # the server's TARGET: the service it dials
    tunnel.start_server()
    if mode == "0":
        wait_log(tunnel.server, r"mode=0 chose forward mode", 5, "the server to say which mode it chose")
    tunnel.start_client()
    wait_log(tunnel.client, r"forward mode: users connect", 10, "the client to listen for users")
    tunnel.target_port = user_port
    tunnel.wait_ready(20)
    integrity(tunnel, streams=4, mib_per_stream=4, deadline_s=60)
    burst(tunnel, count=100)
    assert "launch sent" in tunnel.client.output() and "relaying" in tunnel.server.output()
    assert_spliced(tunnel, tls == "0")


def test_mode_0_picks_reverse_when_the_server_can_listen(procs, nodepass_bin, echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.start()
    wait_log(tunnel.server, r"mode=0 chose reverse mode", 5, "the server to say which mode it chose")
    assert "forward mode" not in tunnel.client.output()


def test_v2_missing_certificate_file_is_a_clear_error_at_start(procs, nodepass_bin, echo_service, tmp_path):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port, "2")
    tunnel.server_query += f"&crt={tmp_path}/missing.crt&key={tmp_path}/missing.key"
    tunnel.start_server(wait_listening=False)
    code = tunnel.server.wait(20)
    assert code == 1
    assert "missing.crt" in tunnel.server.output()


def test_three_clients_share_the_users_and_one_leaving_loses_nothing_of_the_others(procs, nodepass_bin,
                                                                                   echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.client_env["MIN_POOL_CAPACITY"] = "8"
    tunnel.start_server()
    clients = [procs.start(f"client{i}", [nodepass_bin, tunnel.client_url], env=tunnel.client_env) for i in range(3)]
    tunnel.client = clients[0]
    for client in clients:
        wait_log(client, r"authenticated", 15, "each client to authenticate")
    server_pool = pool_port(tunnel)

    def pooled(client) -> int:
        return sum(1 for s in tcp_sockets(client.pid) if s.state == TCP_ESTABLISHED and s.remote_port == server_pool)

    wait_for(lambda: all(pooled(c) >= 8 for c in clients), 15, "8 pool connections from each client")
    burst(tunnel, count=60)
    relayed = [c.output().count("relaying") for c in clients]
    assert all(n > 0 for n in relayed), f"users were not spread over the clients: {relayed}"

    # Long streams through every client, then one client dies in the middle of them.
    results = {}

    def stream(i):
        data = os.urandom(256 * 1024)
        try:
            with connect(tunnel.host, tunnel.target_port, timeout=20) as s:
                received = b""
                for offset in range(0, len(data), 16 * 1024):
                    s.sendall(data[offset:offset + 16 * 1024])
                    received += recv_exact(s, 16 * 1024)
                    time.sleep(0.01)  # keep the stream open across the kill (pacing, not synchronisation)
                results[i] = "ok" if received == data else "corrupt"
        except OSError as exc:
            results[i] = f"broken: {exc!r}"

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(c.output().count("relaying") for c in clients) >= sum(relayed) + 12, 15,
             "all 12 streams relaying")
    victim = clients[1]
    carried_by_victim = victim.output().count("relaying") - relayed[1]
    victim.kill9()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert "corrupt" not in results.values(), results
    ok = sum(1 for v in results.values() if v == "ok")
    # Only streams carried by the dead client may break; every other stream finishes intact.
    assert ok >= 12 - carried_by_victim, (results, carried_by_victim)
    wait_log(tunnel.server, r"client disconnected .*np\.clients=2", 10, "the server to drop the dead client")
    # New users go to the two clients left, every one of them.
    burst(tunnel, count=100)
    assert tunnel.server.alive() and clients[0].alive() and clients[2].alive()


# --------------------------------------------------------------------------- version and key mismatch


def test_wrong_key_fails_at_once_on_both_sides_with_the_peer_address(procs, nodepass_bin, echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.client_key = "not-the-" + KEY
    tunnel.start_server()
    started = time.monotonic()
    tunnel.start_client()
    wait_log(tunnel.client, r"the server did not accept this client's proof of the key", 5,
             "the client to report a failed authentication")
    line = wait_log(tunnel.server, r"client refused .*", 5, "the server to log the refusal")
    assert time.monotonic() - started < 5
    assert re.search(r"np\.peer=127\.0\.0\.1:\d+", line), line
    assert tunnel.pool_connections() == 0
    with pytest.raises(OSError):
        echo_probe(tunnel.host, tunnel.target_port, timeout=7)
    assert tunnel.server.alive() and tunnel.client.alive()
    for proc in (tunnel.server, tunnel.client):
        assert KEY not in proc.output() and tunnel.client_key not in proc.output()


def test_a_client_turned_away_at_capacity_is_no_authentication_failure(procs, nodepass_bin, echo_service):
    """The 65th client holds the key: the server says it is full, in its own words and counter, never as the
    `client refused` line that fail2ban bans on."""
    from test_metrics import scrape, value

    metrics = free_port()
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.server_env["REPORT_INTERVAL"] = "30s"  # the 64 Python clients send no heartbeat
    tunnel.server_query = f"&metrics=127.0.0.1:{metrics}"
    tunnel.start_server()
    key = v2_peer.derive_key(KEY)
    controls = []
    try:
        for _ in range(64):
            control = v2_peer.Control(tunnel.host, tunnel.tunnel_port)
            control.hello()
            control.authenticate(key)
            controls.append(control)
        extra = v2_peer.Control(tunnel.host, tunnel.tunnel_port)
        controls.append(extra)
        extra.hello()
        with pytest.raises(v2_peer.ServerRefused, match="too many clients"):
            extra.authenticate(key)
        line = wait_log(tunnel.server, r"client turned away: .*", 5, "the server to say it is full")
        assert "the server serves as many clients as it accepts" in line and "np.peer=127.0.0.1:" in line, line
        assert "client refused" not in tunnel.server.output()
        samples = scrape(metrics)
        assert value(samples, "nodepass_clients_turned_away_total", role="server") == 1
        assert value(samples, "nodepass_authentication_failures_total", role="server") == 0
    finally:
        for control in controls:
            control.close()


@pytest.mark.parametrize("malformed", [
    (v2_peer.HEARTBEAT, b"x"),  # a heartbeat has no payload
    (v2_peer.LAUNCH, b"\x00\x01"),  # a launch carries 4 bytes
])
def test_a_malformed_frame_after_the_handshake_ends_the_session_and_frees_its_slot(procs, nodepass_bin,
                                                                                  echo_service, malformed):
    """More clients than the server accepts (64) each authenticate and then send a malformed frame: each gets a
    protocol-violation failure and its session ends, so the slots never fill, and the secret of a session
    that ended opens no pool connection."""
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port, tls="0")
    tunnel.server_env["REPORT_INTERVAL"] = "30s"  # the Python clients send no heartbeat
    tunnel.start_server()
    key = v2_peer.derive_key(KEY)
    kind, payload = malformed
    ended = None
    for _ in range(70):
        control = v2_peer.Control(tunnel.host, tunnel.tunnel_port)
        try:
            control.hello()
            ended = control.authenticate(key)
            control.send(kind, payload)
            with pytest.raises(v2_peer.ServerRefused, match="protocol violation: malformed message"):
                control.expect(v2_peer.HEARTBEAT)
            assert control.sock.recv(1) == b"", "the server kept the control channel open"
        finally:
            control.close()
    wait_log(tunnel.server, r"malformed message from the peer; control channel closed .*np\.peer=127\.0\.0\.1:",
             5, "the server to log the malformed message")
    assert "client refused" not in tunnel.server.output(), "a client that held the key was logged as refused"

    # The session of the last client ended with its channel: its secret opens nothing.
    stale = v2_peer.PoolConnection(tunnel.host, ended.pool_port)
    stale.answer(ended)
    assert stale.closed_by_server(timeout=5), "the secret of an ended session opened a pool connection"
    stale.close()

    # And a real client still gets in: 70 ended sessions hold none of the 64 slots.
    tunnel.start_client()
    tunnel.wait_client_connected(10)
    tunnel.wait_ready(10)
    assert echo_probe(tunnel.host, tunnel.target_port)


@pytest.mark.parametrize("keyed_side", ["server", "client"])
def test_v1_and_v2_peers_fail_at_once_with_a_clear_message(procs, nodepass_bin, echo_service, keyed_side):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    if keyed_side == "server":
        tunnel.server_key = KEY
    else:
        tunnel.client_key = KEY
    tunnel.start_server()
    tunnel.start_client()
    if keyed_side == "server":
        wait_log(tunnel.server, r"client refused .*has no key", 5, "the v2 server to refuse the v1 client")
        wait_log(tunnel.client, r"closed the connection before announcing its pool port", 5,
                 "the v1 client to say why")
    else:
        wait_log(tunnel.server, r"client refused: it has a key", 5, "the v1 server to refuse the v2 client")
        wait_log(tunnel.client, r"the server has no key \(protocol v1\)", 5, "the v2 client to report the server's answer")


@pytest.mark.interop
@pytest.mark.parametrize("go_side", ["server", "client"])
def test_v2_against_the_go_original_fails_at_once(procs, nodepass_bin, go_peer_bin, echo_service, go_side):
    if go_side == "server":
        tunnel = Tunnel(procs, go_peer_bin, nodepass_bin, echo_service.port)
        tunnel.client_key = KEY
        tunnel.start_server()
        tunnel.start_client()
        wait_log(tunnel.client, r"the server has no key \(protocol v1\)", 5, "our v2 client to detect the v1 server")
    else:
        tunnel = Tunnel(procs, nodepass_bin, go_peer_bin, echo_service.port)
        tunnel.server_key = KEY
        tunnel.start_server()
        tunnel.start_client()
        wait_log(tunnel.server, r"client refused .*has no key", 5, "our v2 server to refuse the Go client")
        assert tunnel.server.alive()


# --------------------------------------------------------------------------- attacks


def test_tls_without_the_key_gets_nothing_on_the_tunnel_port(procs, nodepass_bin, echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.start_server()
    host, port = tunnel.host, tunnel.tunnel_port

    # TLS with ALPN but a guessed proof: a failure frame, then the close.
    guesser = v2_peer.Control(host, port)
    guesser.hello()
    with pytest.raises(v2_peer.ServerRefused, match="authentication failed"):
        guesser.authenticate(v2_peer.derive_key("guess"))
    guesser.close()

    # TLS without ALPN (a v1 client or a scanner): closed without a single NodePass byte.
    plain_tls = v2_peer.Control(host, port, alpn=False)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        v2_peer.read_frame(plain_tls.sock)
    plain_tls.close()

    # A frame announcing more than 1024 bytes: refused from its header.
    big = v2_peer.Control(host, port)
    big.sock.sendall(bytes([0x01, 0xFF, 0xFF]) + b"x" * 64)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        v2_peer.read_frame(big.sock)
    big.close()

    wait_for(lambda: len(re.findall(r"client refused .*np\.peer=127\.0\.0\.1:\d+", tunnel.server.output())) >= 3,
             5, "three refusals logged with the peer address")
    assert tunnel.server.alive()
    # The real client still gets in.
    tunnel.start_client()
    tunnel.wait_client_connected(10)
    tunnel.wait_ready(20)


def test_replayed_handshake_and_pool_opening_are_refused(procs, nodepass_bin, echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port, tls="0")
    tunnel.start_server()
    host = tunnel.host

    # The Python client knows the key: a full handshake and a pool connection succeed (interop check).
    control, session = v2_peer.handshake(host, tunnel.tunnel_port, KEY)
    assert session.mode == 1 and session.tls == 0 and len(session.session_id) == 16
    legit = v2_peer.PoolConnection(host, session.pool_port)
    recorded_answer = legit.answer(session)
    assert legit.finish(session) >= 0
    recorded_hello, recorded_proof = control.sent[0], control.sent[1]

    # Replay the recorded handshake on a new TLS connection, without the key.
    replayer = v2_peer.Control(host, tunnel.tunnel_port)
    replayer.sock.sendall(recorded_hello)
    v2_peer.read_frame(replayer.sock)  # a fresh challenge, which the recording cannot answer
    replayer.sock.sendall(recorded_proof)
    kind, payload = v2_peer.read_frame(replayer.sock)
    assert kind == v2_peer.FAILURE and payload[0] == 1
    replayer.close()

    # Replay the recorded pool-connection answer on a new pool connection (the session is still alive).
    replayed = v2_peer.PoolConnection(host, session.pool_port)
    replayed.sock.sendall(recorded_answer)
    assert replayed.closed_by_server(timeout=5), "a replayed pool opening was kept"
    replayed.close()
    wait_log(tunnel.server, r"pool connection refused: authentication failed .*np\.peer=127\.0\.0\.1:\d+", 5,
             "the pool refusal with the peer address")
    legit.close()
    control.close()


def test_strangers_queued_on_the_pool_port_never_receive_user_data(procs, nodepass_bin, echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port, tls="0")
    tunnel.start()
    port = pool_port(tunnel)
    idle = [v2_peer.PoolConnection(tunnel.host, port) for _ in range(10)]
    guessing = []
    for _ in range(10):
        conn = v2_peer.PoolConnection(tunnel.host, port)
        conn.sock.sendall(os.urandom(48))
        guessing.append(conn)
    burst(tunnel, count=50)
    for conn in guessing:
        assert conn.closed_by_server(timeout=5), "a stranger with a guessed answer was kept"
    for conn in idle:
        # Nothing but the 32-byte nonce, then the close when the opening times out (5 s).
        assert conn.closed_by_server(timeout=10), "an idle stranger received data or was kept"
    for conn in idle + guessing:
        conn.close()
    assert tunnel.server.alive()


def test_100_idle_sockets_on_the_tunnel_port_do_not_block_the_v2_client(procs, nodepass_bin, echo_service):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.start_server()
    idle = [connect(tunnel.host, tunnel.tunnel_port) for _ in range(100)]
    try:
        tunnel.start_client()
        tunnel.wait_client_connected(6)
        tunnel.wait_ready(20)
    finally:
        for s in idle:
            s.close()


class TerminatingProxy:
    """A man in the middle: terminates the client's TLS with its own certificate (offering nodepass/2) and
    opens its own TLS connection to the server, relaying the plaintext both ways."""

    def __init__(self, upstream_port: int, cert: str, key: str):
        self.upstream_port = upstream_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols([v2_peer.ALPN])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.relayed = {"to_server": 0, "to_client": 0}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self.handle, args=(raw,), daemon=True).start()

    def handle(self, raw):
        try:
            client = self.ctx.wrap_socket(raw, server_side=True)
            upstream = v2_peer.tls_client_context().wrap_socket(
                socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10))
        except (OSError, ssl.SSLError):
            raw.close()
            return

        # One thread relays both ways: an SSL socket must not be read and written from two threads at once.
        peers = {client: (upstream, "to_server"), upstream: (client, "to_client")}
        try:
            for s in peers:
                s.settimeout(10)
            while not self.stopping.is_set():
                ready = [s for s in peers if s.pending()] or select.select(list(peers), [], [], 10)[0]
                if not ready:
                    break
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        raise ConnectionError("closed")
                    dst, name = peers[src]
                    self.relayed[name] += len(data)
                    dst.sendall(data)
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            for s in peers:
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.stopping.set()
        self.listener.close()
        self.thread.join(5)


def test_a_tls_terminating_man_in_the_middle_fails_on_both_sides(procs, nodepass_bin, echo_service, data_cert):
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)
    tunnel.start_server()
    proxy = TerminatingProxy(tunnel.tunnel_port, *data_cert)
    try:
        real_port = tunnel.tunnel_port
        tunnel.tunnel_port = proxy.port
        tunnel.start_client()
        wait_log(tunnel.server, r"client refused .*proof does not match", 10, "the server to refuse the relayed proof")
        wait_log(tunnel.client, r"did not accept this client's proof of the key", 10, "the client to fail")
        # The proxy did carry the handshake both ways: the failure is the binding, not a broken relay.
        assert proxy.relayed["to_server"] >= 3 + 33 + 3 + 32 and proxy.relayed["to_client"] >= 3 + 33
        tunnel.tunnel_port = real_port
        assert "authenticated" not in tunnel.client.output()
        server_pool = pool_port(tunnel)
        assert not any(s.remote_port == server_pool for s in tunnel.client_connections())
    finally:
        proxy.close()


class PoolPortInterceptor:
    """Someone on the path to the server (on 127.0.0.1), reached by the client at 127.0.0.2: the control
    channel passes untouched, and on the pool port the plain opening (nonce, answer) passes too, after which
    the interceptor answers the client's TLS itself, with its own certificate."""

    def __init__(self, tunnel_port: int, pool_port: int, cert: str, key: str):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.pool_port = pool_port
        self.tls_attempts = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listeners = []
        for port, handle in ((tunnel_port, self.forward_control), (pool_port, self.intercept_pool)):
            listener = socket.create_server(("127.0.0.2", port))
            listener.settimeout(0.5)
            self.listeners.append(listener)
            threading.Thread(target=self.serve, args=(listener, handle, port), daemon=True).start()

    def serve(self, listener, handle, port):
        while not self.stopping.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=self.guarded, args=(handle, raw, port), daemon=True).start()

    def guarded(self, handle, raw, port):
        upstream = None
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
            for s in (raw, upstream):
                s.settimeout(10)
            handle(raw, upstream)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (raw, upstream):
                if s is not None:
                    s.close()

    def forward_control(self, client, server):
        peers = {client: server, server: client}
        while not self.stopping.is_set():
            for src in select.select(list(peers), [], [], 0.5)[0]:
                data = src.recv(65536)
                if not data:
                    return
                peers[src].sendall(data)

    def intercept_pool(self, client, server):
        client.sendall(recv_exact(server, 32))  # the server's nonce
        server.sendall(recv_exact(client, 16 + 32))  # the client's session ID and proof
        with self.lock:
            self.tls_attempts += 1
        self.ctx.wrap_socket(client, server_side=True)  # the client refuses this certificate

    def close(self):
        self.stopping.set()
        for listener in self.listeners:
            listener.close()


def test_a_pool_certificate_that_is_not_the_announced_one_is_logged_once_counted_and_retried_rarely(
        procs, nodepass_bin, echo_service, data_cert, tmp_path):
    """The pool port's TLS (tls=2: tls=1 has no certificate on pool connections since nodepass/2.2) is
    intercepted with another certificate (the control channel is not): the client logs the mismatch once,
    at error, with the address it dialled, counts every one, and probes one connection at a time after
    longer and longer pauses instead of its whole pool every second."""
    from test_metrics import scrape, value

    pool, metrics = free_port(), free_port()
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port, tls="2")
    tunnel.server_query += f"&pool={pool}&crt={data_cert[0]}&key={data_cert[1]}"
    tunnel.start_server()
    other = self_signed(tmp_path, "other", "nodepass-e2e-other")
    interceptor = PoolPortInterceptor(tunnel.tunnel_port, pool, str(other[0]), str(other[1]))
    try:
        client = procs.start("client", [
            nodepass_bin,
            f"client://{KEY}@127.0.0.2:{tunnel.tunnel_port}/127.0.0.1:{echo_service.port}?log=info"
            f"&metrics=127.0.0.1:{metrics}"], env={"MIN_POOL_CAPACITY": "16", "SERVICE_COOLDOWN": "500ms"})
        wait_log(client, r"authenticated", 10, "the client's control channel through the interceptor")
        line = wait_log(client, r"ERROR  pool connection refused: its TLS certificate is not the one .*", 10,
                        "the client to log the mismatch")
        assert f"np.peer=127.0.0.2:{pool}" in line, line
        # Eight seconds hold the first 16 dials and the probes after 0, 1 and 3 quiet periods (at 1, 3 and
        # 7 s); the client used to dial its whole pool again every second (16 x 8).
        time.sleep(8)
        attempts = interceptor.tls_attempts
        assert 16 <= attempts <= 16 + 4, attempts
        assert wait_for(lambda: value(scrape(metrics), "nodepass_pool_certificate_mismatches_total",
                                      role="client") == interceptor.tls_attempts, 3, "the counter")
        assert client.output().count("pool connection refused: its TLS certificate") == 1, client.output()
        assert client.alive()
    finally:
        interceptor.close()


def test_a_relayed_pool_proof_without_the_confirmation_never_gets_a_user(procs, nodepass_bin, echo_service):
    """Someone on the path passes a real client's pool proof on to the server, then runs the TLS handshake
    with the server itself. The server must not put that connection in its pool: the confirmation, which
    only the real client could send inside its own TLS session, never comes."""
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)  # tls=1
    tunnel.server_env["REPORT_INTERVAL"] = "30s"  # the Python client sends no heartbeats
    tunnel.start_server()
    control, session = v2_peer.handshake(tunnel.host, tunnel.tunnel_port, KEY)
    assert session.tls == 1
    try:
        stolen = v2_peer.PoolConnection(tunnel.host, session.pool_port)
        # The real client's answer to this nonce, as the attacker would relay it.
        stolen.answer(session)
        stolen.sock = v2_peer.tls_client_context(alpn=False).wrap_socket(stolen.sock)
        assert len(v2_peer.recv_exact(stolen.sock, 36)) == 36  # the ID: the attacker gets this far, no further
        # A user arrives: it must not be relayed over the unconfirmed connection.
        with connect(tunnel.host, tunnel.target_port, timeout=10) as user:
            user.sendall(b"secret user data")
            assert stolen.closed_by_server(timeout=8), "the unconfirmed connection received data or was kept"
            user.settimeout(8)
            try:
                assert user.recv(64) == b"", "the user was relayed somewhere"
            except ConnectionResetError:
                pass
        assert "launch sent" not in tunnel.server.output()
        stolen.close()
    finally:
        control.close()


def test_the_python_peer_relays_over_sealed_pool_connections(procs, nodepass_bin, echo_service):
    """An independent client (v2_peer, written from docs/PROTOCOL.md) negotiates nodepass/2.2 and gets sealed
    pool connections for tls=1; a user's bytes cross them both ways, a half-close crosses as the end record,
    a record with one changed bit ends its connection without reaching the user, and the user of a
    connection that is forged into or cut gets a reset, not a clean end."""
    tunnel = v2_tunnel(procs, nodepass_bin, echo_service.port)  # tls=1
    tunnel.server_env["REPORT_INTERVAL"] = "30s"  # the Python client sends no heartbeats
    tunnel.start_server()
    control, session = v2_peer.handshake(tunnel.host, tunnel.tunnel_port, KEY, sealed=True)
    assert control.alpn == v2_peer.ALPN_SEALED
    assert session.tls == v2_peer.TLS_SEALED and session.data_fingerprint == b""

    def launched_pool_connection(user, split=False):
        pool = v2_peer.PoolConnection(tunnel.host, session.pool_port)
        if split:  # the proof, then the client's nonce in a write of its own, a moment later (another read)
            pool.client_nonce = os.urandom(32)
            pool.sock.sendall(session.session_id + v2_peer.mac(session.secret, b"pool client", pool.nonce))
            time.sleep(0.2)
            pool.sock.sendall(pool.client_nonce)
        else:
            pool.answer(session)
        pool_id = pool.finish(session)
        user.sendall(b"question")
        while True:
            kind, payload = v2_peer.read_frame(control.sock)
            if kind == v2_peer.LAUNCH:
                assert struct.unpack(">I", payload)[0] == pool_id
                return pool
            assert kind == v2_peer.HEARTBEAT, f"unexpected control frame {kind}"

    with connect(tunnel.host, tunnel.target_port) as user:
        pool = launched_pool_connection(user)
        assert recv_exact(pool.sock, 8) == b"question"
        answer = os.urandom(150_000)  # three records
        pool.sock.sendall(answer)
        assert recv_exact(user, len(answer)) == answer
        user.shutdown(socket.SHUT_WR)
        assert pool.sock.recv(1) == b"" and pool.sock.ended, "the user's half-close arrives as the end record"
        pool.sock.sendall(b"after the user's end")
        assert recv_exact(user, 20) == b"after the user's end"
        pool.sock.send_end()
        user.settimeout(5)
        assert user.recv(1) == b"", "the end record reaches the user as a clean end"
        pool.close()

    with connect(tunnel.host, tunnel.target_port) as user:
        pool = launched_pool_connection(user, split=True)
        assert recv_exact(pool.sock, 8) == b"question"
        forged = bytearray(v2_peer.seal_record(pool.sock.send_key, pool.sock.send_number, b"forged"))
        forged[-1] ^= 1
        pool.sock.raw.sendall(bytes(forged))
        user.settimeout(5)
        with pytest.raises(ConnectionResetError):  # never the forged bytes, nor a clean end
            user.recv(100)
        assert pool.closed_by_server(5)

    with connect(tunnel.host, tunnel.target_port) as user:
        pool = launched_pool_connection(user)
        assert recv_exact(pool.sock, 8) == b"question"
        pool.sock.sendall(b"the start of an answer")
        assert recv_exact(user, 22) == b"the start of an answer"
        pool.sock.raw.close()  # cut: no end record
        user.settimeout(5)
        with pytest.raises(ConnectionResetError):  # a cut stream must not look complete to the user
            user.recv(100)
    wait_log(tunnel.server, r"sealed pool connection closed: it broke the protocol .*np\.peer=127\.0\.0\.1:", 5,
             "the server to log the forged record")
    control.close()

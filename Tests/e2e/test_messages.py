"""What a newcomer reads: the exact words of the common failures, one line per attempt, no false alarm at
shutdown, the start-up line, `nodepass key`, the pairing command a server logs, and `pool=PORT`."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from typing import List, Optional, Tuple

import pytest

from support.certs import self_signed
from support.ports import free_port
from support.probes import echo_probe
from support.procfs import TCP_ESTABLISHED, is_listening, tcp_sockets
from support.tunnel import DEFAULT_ENV, Tunnel
from support.waiting import wait_for

pytestmark = pytest.mark.ours_only

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210fedcba9876543210"
LINE = re.compile(r"^\S+ \S+  (DEBUG|INFO|WARN|ERROR|FATAL)  (.*)$")


def log_lines(text: str, level: str) -> List[Tuple[str, str]]:
    """(message, metadata) of each line at `level`; the metadata are the trailing ` np.…=…` fields."""
    lines = []
    for raw in text.splitlines():
        match = LINE.match(raw)
        if not match or match.group(1) != level:
            continue
        message, _, metadata = match.group(2).partition(" np.")
        lines.append((message, "np." + metadata if metadata else ""))
    return lines


def wait_message(proc, level: str, start: str, timeout: float = 10.0) -> Tuple[str, str]:
    """The first line at `level` whose message starts with `start`."""

    def found():
        return next((line for line in log_lines(proc.output(), level) if line[0].startswith(start)), None)

    return wait_for(found, timeout, f"{proc.name} to log {level} {start!r}")


def client(procs, nodepass_bin, url: str, env: Optional[dict] = None):
    return procs.start("client", [nodepass_bin, url], env=dict(DEFAULT_ENV, **(env or {})))


def test_a_port_in_use_is_said_in_words_and_exits_1(procs, nodepass_bin):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        server = procs.start("server", [nodepass_bin, f"server://{KEY}@127.0.0.1:{port}/127.0.0.1:{free_port()}"])
        assert server.wait(10) == 1
        assert (f"cannot listen on 127.0.0.1:{port}: address already in use", "") in log_lines(
            server.output(), "FATAL"), server.output()
    finally:
        holder.close()


def test_a_refused_connection_is_said_once_per_attempt(procs, nodepass_bin):
    port = free_port()
    proc = client(procs, nodepass_bin, f"client://{KEY}@127.0.0.1:{port}/127.0.0.1:{free_port()}",
                  env={"SERVICE_COOLDOWN": "100ms"})
    message, metadata = wait_message(proc, "ERROR", "cannot reach")
    assert message == f"cannot reach the server at 127.0.0.1:{port}: connection refused"
    assert re.fullmatch(r"np\.retry=\d+ms", metadata), metadata
    # Each attempt is one line, with the next wait: the waits double (100 ms, then more).
    wait_for(lambda: len(log_lines(proc.output(), "ERROR")) >= 3, 10, "three attempts")
    errors = log_lines(proc.output(), "ERROR")
    assert all(m == message for m, _ in errors), errors
    assert "Connection errors" not in proc.output() and "errno" not in proc.output()


def test_an_unreachable_network_is_said_in_words(procs, nodepass_bin):
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("no network namespace for an unreachable network (unshare -n)")
    # A namespace of its own has no route anywhere: the connect fails with ENETUNREACH.
    proc = procs.start("client", [unshare, "-n", nodepass_bin, f"client://{KEY}@10.1.2.3:10101/127.0.0.1:80"],
                       env=DEFAULT_ENV)
    message, _ = wait_message(proc, "ERROR", "cannot reach")
    assert message == "cannot reach the server at 10.1.2.3:10101: network is unreachable"


def test_a_name_that_does_not_resolve_is_said_in_words(procs, nodepass_bin):
    proc = client(procs, nodepass_bin, f"client://{KEY}@nodepass-e2e.invalid:10101/127.0.0.1:80")
    message, _ = wait_message(proc, "ERROR", "cannot reach", timeout=30)
    # .invalid never resolves (RFC 6761); without a reachable DNS server the resolver says so instead, or
    # the look-up outlasts the dial's 10 s.
    assert message in ("cannot reach the server at nodepass-e2e.invalid:10101: name not found",
                       "cannot reach the server at nodepass-e2e.invalid:10101: the name could not be looked up "
                       "now (is a DNS server reachable?)",
                       "cannot reach the server at nodepass-e2e.invalid:10101: timed out after 10s"), message


def test_a_peer_that_does_not_speak_tls_is_said_in_words(procs, nodepass_bin):
    port = free_port()
    web = procs.start("web", ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    wait_for(lambda: is_listening(web.pid, port), 10, "the web server")
    for name, key in (("v2", f"{KEY}@"), ("v1", "")):
        proc = client(procs, nodepass_bin, f"client://{key}127.0.0.1:{port}/127.0.0.1:80")
        message, metadata = wait_message(proc, "ERROR", "the TLS handshake")
        assert message == "the TLS handshake with the server failed: the other side does not speak TLS", name
        assert f"np.server=127.0.0.1:{port}" in metadata, (name, metadata)
        assert "BoringSSL" not in proc.output() and "OPENSSL" not in proc.output(), name
        proc.stop()


def test_a_wrong_key_says_what_to_change_once_per_attempt(procs, nodepass_bin, echo_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info",
                    client_env={"SERVICE_COOLDOWN": "100ms"})
    tunnel.server_key = KEY
    tunnel.client_key = OTHER_KEY
    tunnel.start_server()
    tunnel.start_client()
    wait_for(lambda: tunnel.server.output().count("client refused") >= 3, 15, "three refused attempts")
    tunnel.client.stop()
    errors = log_lines(tunnel.client.output(), "ERROR")
    expected = ("the server did not accept this client's proof of the key: give both sides the same key (if they "
                "have it, something between them is not the server)")
    assert errors and all(m == expected for m, _ in errors), errors
    # One line per attempt, not two (the client may stop between the server's refusal and its own line).
    refusals = tunnel.server.output().count("client refused")
    assert refusals - 1 <= len(errors) <= refusals, (refusals, tunnel.client.output())


@pytest.mark.parametrize("keyed_side", ["server", "client"])
def test_a_version_mismatch_says_what_to_change(procs, nodepass_bin, echo_service, keyed_side):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info")
    if keyed_side == "server":
        tunnel.server_key = KEY
        expected = ("the server closed the connection before announcing its pool port: if it has a key "
                    "(protocol v2), give this client the same key")
    else:
        tunnel.client_key = KEY
        expected = "the server has no key (protocol v1): give the server the same key as this client"
    tunnel.start_server()
    tunnel.start_client()
    message, _ = wait_message(tunnel.client, "ERROR", "the server")
    assert message == expected
    assert all(m == expected for m, _ in log_lines(tunnel.client.output(), "ERROR")), tunnel.client.output()


def test_a_server_that_stops_is_no_pool_failure(procs, nodepass_bin, echo_service):
    """When the server stops, the client's idle pool connections close and their replacements are refused:
    that is the server going away, said once as the lost control channel, not as a pool failure."""
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info",
                    client_env={"SERVICE_COOLDOWN": "3s"}).use_key(KEY)
    tunnel.start()
    tunnel.server.signal(signal.SIGINT)
    assert tunnel.server.wait(10) == 0
    wait_message(tunnel.client, "ERROR", "control channel lost")
    # A pool period (1 s) passes with the server gone, before the next attempt (3 s).
    wait_for(lambda: "cannot reach the server" in tunnel.client.output(), 10, "the next attempt")
    tunnel.client.signal(signal.SIGINT)
    assert tunnel.client.wait(10) == 0
    warnings = log_lines(tunnel.client.output(), "WARN")
    assert not [w for w in warnings if "pool" in w[0]], warnings


def test_a_pool_port_that_cannot_be_reached_is_said_while_the_server_is_there(procs, nodepass_bin, tmp_path):
    """A v1 server (TLS, written here) that announces a pool port where nothing listens: the client says, at
    warn level and in words, that it cannot open pool connections there, while the control channel lives."""
    crt, key = self_signed(tmp_path, "control", "fake-v1-server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(crt), str(key))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port, closed_port = listener.getsockname()[1], free_port()
    done = threading.Event()

    def serve_one_client():
        listener.settimeout(10)
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        with context.wrap_socket(raw, server_side=True) as conn:
            while not done.wait(0.5):
                conn.sendall(f"remote://{closed_port}\n".encode())

    thread = threading.Thread(target=serve_one_client, daemon=True)
    thread.start()
    try:
        proc = client(procs, nodepass_bin, f"client://127.0.0.1:{port}/127.0.0.1:80")
        message, metadata = wait_message(proc, "WARN", "cannot open pool connections")
        assert message == (f"cannot open pool connections to the server at 127.0.0.1:{closed_port}: connection "
                           "refused (the server's pool port must be reachable from here)")
        assert re.fullmatch(r"np\.failures=\d+", metadata), metadata
    finally:
        done.set()
        thread.join(5)
        listener.close()


def test_the_start_line_says_the_protocol_this_instance_speaks(procs, nodepass_bin, echo_service):
    v2 = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info").use_key(KEY).start()
    v1 = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info").start()
    for proc in (v2.server, v2.client):
        assert 'np.protocol="v2 (with a key, TCP and UDP)" ' in proc.output(), proc.output()
        assert "np.protocol=v1" not in proc.output()
    for proc in (v1.server, v1.client):
        assert 'np.protocol="v1 (NodePass 1.0 compatible, no key, TCP)" ' in proc.output(), proc.output()


def test_errors_before_start_share_one_format(nodepass_bin):
    env_error = subprocess.run([nodepass_bin, f"server://127.0.0.1:{free_port()}/127.0.0.1:{free_port()}"],
                               capture_output=True, text=True, env={"SEMAPHORE_LIMIT": "x"}, timeout=10)
    url_error = subprocess.run([nodepass_bin, "server://127.0.0.1/x"], capture_output=True, text=True, timeout=10)
    assert env_error.returncode == 78 and url_error.returncode == 64
    assert env_error.stderr.startswith("Error: SEMAPHORE_LIMIT='x' "), env_error.stderr
    assert url_error.stderr.startswith("Error: "), url_error.stderr


def test_nodepass_key_prints_a_fresh_key_that_pairs_a_tunnel(procs, nodepass_bin, echo_service):
    keys = [subprocess.run([nodepass_bin, "key"], capture_output=True, text=True, timeout=10) for _ in range(2)]
    assert all(k.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}\n", k.stdout) for k in keys), keys
    assert keys[0].stdout != keys[1].stdout
    key = keys[0].stdout.strip()

    # The server logs the client's command, without the key; run as logged, with the key in NODEPASS_KEY,
    # it pairs.
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info",
                    server_env={"NODEPASS_KEY": key})
    tunnel.start_server()
    message, _ = wait_message(tunnel.server, "INFO", "to pair a client")
    assert key not in tunnel.server.output()
    command = re.search(r'nodepass "(client://[^"]+)"$', message)
    assert command, message
    assert command.group(1) == f"client://127.0.0.1:{tunnel.tunnel_port}/TARGET_HOST:PORT"
    url = command.group(1).replace("TARGET_HOST:PORT", f"127.0.0.1:{echo_service.port}")
    tunnel.client = procs.start("client", [nodepass_bin, url], env=dict(DEFAULT_ENV, NODEPASS_KEY=key))
    tunnel.wait_client_connected(20)
    tunnel.wait_ready(20)
    assert key not in tunnel.client.output()


@pytest.mark.parametrize("keyed", [True, False], ids=["v2", "v1"])
def test_pool_port_is_fixed_by_the_server_url(procs, nodepass_bin, echo_service, keyed):
    pool = free_port()
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, log="info")
    if keyed:
        tunnel.use_key(KEY)
    tunnel.server_query = f"&pool={pool}"
    for attempt in range(2):
        tunnel.start()
        assert f"np.pool={pool} " in tunnel.server.output(), tunnel.server.output()
        pool_ports = {s.remote_port for s in tcp_sockets(tunnel.client.pid)
                      if s.state == TCP_ESTABLISHED and s.remote_port not in (tunnel.tunnel_port, echo_service.port)}
        assert pool_ports == {pool}, (attempt, pool_ports)
        assert echo_probe("127.0.0.1", tunnel.target_port)
        # The same port after a restart: the firewall rule stays true.
        tunnel.stop()


def test_pool_port_errors(nodepass_bin):
    cases = {
        f"client://{KEY}@127.0.0.1:10101/127.0.0.1:80?pool=10102": "pool= is set on the server",
        f"server://{KEY}@127.0.0.1:10101/127.0.0.1:80?pool=10101": "pool=10101 is also the tunnel port",
        "server://127.0.0.1:10101/127.0.0.1:80?pool=70000": "pool='70000' is not a port number",
    }
    for url, words in cases.items():
        result = subprocess.run([nodepass_bin, url], capture_output=True, text=True, timeout=10)
        assert result.returncode == 64 and words in result.stderr, (url, result.stderr)

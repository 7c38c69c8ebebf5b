"""UDP through a v2 tunnel (nodepass/2.1) against the built binary: datagram boundaries, real DNS software
(dig, dnsperf against dnsmasq), flows, their bound and expiry, what `noudp=1` and `notcp=1` change, several
clients, and the wire checked by the independent Python peer (v2_peer.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, Optional

import pytest

from support.certs import self_signed
from support.ports import free_port
from support.processes import Proc
from support.procfs import is_listening
from support.sockets import connect, recv_exact
from support.tunnel import Tunnel
from support.waiting import wait_for
import v2_peer

pytestmark = pytest.mark.ours_only

KEY = "e2e-udp-" + secrets.token_hex(12)
UDP_ECHO = Path(__file__).resolve().parent / "helpers" / "udp_echo.py"
# Every size class of the issue, the largest IPv4 payload included.
SIZES = [0, 1, 512, 1200, 1472, 8192, 65507]


def start_udp_echo(procs, port: int, host: str = "127.0.0.1", delay_ms: float = 0.0) -> Proc:
    proc = procs.start("udp-echo", [sys.executable, str(UDP_ECHO), "--host", host, "--port", str(port),
                                    "--delay-ms", str(delay_ms)])
    wait_for(lambda: "ready" in proc.output(), 15, f"the UDP echo service on port {port}")
    return proc


def wait_log(proc, pattern: str, timeout: float, what: str) -> str:
    def found():
        match = re.search(pattern, proc.output())
        return match.group(0) if match else None

    return wait_for(found, timeout, what)


class User:
    """A UDP user of the tunnel: one source address (one flow)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.connect((host, port))
        self.sock.settimeout(timeout)

    def exchange(self, payload: bytes) -> bytes:
        self.sock.send(payload)
        return self.sock.recv(65535)

    def close(self) -> None:
        self.sock.close()


def wait_udp_ready(host: str, port: int, timeout: float = 20.0) -> None:
    """A datagram goes through the tunnel and back (the first may go before the client's pool is up)."""

    def attempt() -> bool:
        user = User(host, port, timeout=1.0)
        try:
            token = secrets.token_bytes(16)
            return user.exchange(token) == token
        except OSError:
            return False
        finally:
            user.close()

    wait_for(attempt, timeout, f"a datagram round trip through the tunnel (port {port})")


def numbered(seq: int, size: int) -> bytes:
    """A datagram of `size` bytes that carries its sequence number and a checksum of the rest (from 8 bytes)."""
    if size < 8:
        return bytes([seq & 0xFF]) * size
    body = os.urandom(size - 8)
    return struct.pack(">II", seq, zlib.crc32(body)) + body


def check_numbered(datagram: bytes, sizes: Dict[int, int]) -> int:
    """The sequence number of an intact datagram from `sizes` (seq -> size); fails on a cut or merged one."""
    assert len(datagram) >= 8, f"a short datagram came back where only long ones were sent: {len(datagram)}"
    seq, checksum = struct.unpack(">II", datagram[:8])
    assert seq in sizes, f"unknown sequence number {seq}"
    assert len(datagram) == sizes[seq], f"datagram {seq}: {len(datagram)} bytes, sent {sizes[seq]} (cut or merged)"
    assert zlib.crc32(datagram[8:]) == checksum, f"datagram {seq}: corrupted"
    return seq


def udp_tunnel(procs, nodepass_bin, echo_service, *, tls: Optional[str] = None, mode: str = "1",
               env: Optional[Dict[str, str]] = None, query: str = "") -> Tunnel:
    """A v2 tunnel to a service that echoes TCP and UDP on one port; started, with TCP and UDP ready.
    In forward mode (mode=2) users connect to the client: `tunnel.target_port` is then the client's TARGET."""
    start_udp_echo(procs, echo_service.port)
    forward = mode == "2"
    service_port = free_port() if forward else echo_service.port
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, service_port, env=env).use_key(KEY)
    tunnel.server_query = f"&mode={mode}" + (f"&tls={tls}" if tls is not None else "") + query
    if forward:
        user_port = tunnel.service_port
        tunnel.target_port = echo_service.port
        tunnel.start_server()
        tunnel.start_client()
        wait_log(tunnel.client, r"forward mode: users connect .*np\.udp=on", 15, "the client's TCP and UDP listeners")
        tunnel.target_port = user_port
        tunnel.wait_ready(20)
    else:
        tunnel.start()
    wait_udp_ready(tunnel.host, tunnel.target_port)
    return tunnel


def metric(tunnel_metrics_port: int, name: str, labels: str = "") -> float:
    """A value from the Prometheus text of a process's metrics endpoint (0 when absent)."""
    with connect("127.0.0.1", tunnel_metrics_port, 5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name) and all(part in line for part in labels.split(",") if part):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- datagrams


@pytest.mark.parametrize("mode,tls", [("1", "0"), ("1", "1"), ("1", "2"), ("2", "0"), ("2", "1")])
def test_every_datagram_arrives_whole_and_alone(procs, nodepass_bin, echo_service, mode, tls, tmp_path):
    query = ""
    if tls == "2":
        crt, key = self_signed(tmp_path, "data", "e2e-udp")
        query = f"&crt={crt}&key={key}"
    tunnel = udp_tunnel(procs, nodepass_bin, echo_service, tls=tls, mode=mode, query=query)
    user = User(tunnel.host, tunnel.target_port)
    # One at a time: each size comes back byte for byte.
    for size in SIZES + [random.randrange(0, 65508) for _ in range(8)]:
        payload = numbered(size, size)
        assert user.exchange(payload) == payload, f"a datagram of {size} bytes did not come back intact"
    # Bursts of ten back to back (about 20 MB/s; they queue in the tunnel): whatever arrives is whole and
    # alone, and on loopback nearly everything arrives. (The pause paces the sender, a debug build included;
    # it synchronises nothing.)
    sizes: Dict[int, int] = {}
    for seq in range(600):
        size = random.choice([8, 64, 512, 1200, 1472, 4096, 8192, 16384]) if seq % 50 else 65507
        sizes[seq] = size
        user.sock.send(numbered(seq, size))
        if seq % 10 == 9:
            time.sleep(0.002)
    seen = set()
    user.sock.settimeout(3.0)
    try:
        while len(seen) < len(sizes):
            seq = check_numbered(user.sock.recv(65535), sizes)
            assert seq not in seen, f"datagram {seq} came back twice"
            seen.add(seq)
    except socket.timeout:
        pass
    assert len(seen) >= 0.95 * len(sizes), f"only {len(seen)} of {len(sizes)} datagrams came back"
    user.close()
    for proc in (tunnel.server, tunnel.client):
        assert KEY not in proc.output()


def test_two_thousand_flows_at_once_each_gets_its_own_replies(procs, nodepass_bin, echo_service):
    metrics_port = free_port()
    tunnel = udp_tunnel(procs, nodepass_bin, echo_service, env={"UDP_IDLE_TIMEOUT": "2s"},
                        query=f"&metrics=127.0.0.1:{metrics_port}")
    users = [User(tunnel.host, tunnel.target_port, timeout=10.0) for _ in range(2000)]
    for number, user in enumerate(users):
        user.sock.send(struct.pack(">I", number) + b"flow")
    for number, user in enumerate(users):
        # Each source address gets back exactly what it sent, not another flow's datagram.
        assert user.sock.recv(100) == struct.pack(">I", number) + b"flow"
    assert metric(metrics_port, "nodepass_udp_flows") >= 2000
    for user in users:
        user.close()
    # Idle for UDP_IDLE_TIMEOUT: every flow is forgotten.
    wait_for(lambda: metric(metrics_port, "nodepass_udp_flows") == 0, 15, "the idle flows to expire")
    assert metric(metrics_port, "nodepass_udp_datagrams_total", 'direction="upstream"') >= 2000
    assert metric(metrics_port, "nodepass_udp_datagrams_total", 'direction="downstream"') >= 2000


def test_the_flow_bound_drops_new_flows_and_says_so(procs, nodepass_bin, echo_service):
    metrics_port = free_port()
    tunnel = udp_tunnel(procs, nodepass_bin, echo_service, env={"UDP_MAX_FLOWS": "20"},
                        query=f"&metrics=127.0.0.1:{metrics_port}")
    # wait_udp_ready's flow is one of the 20.
    users = [User(tunnel.host, tunnel.target_port, timeout=1.0) for _ in range(40)]
    answered = 0
    for user in users:
        try:
            answered += user.exchange(b"x") == b"x"
        except socket.timeout:
            pass
    assert 15 <= answered <= 20, f"{answered} of 40 new flows answered with UDP_MAX_FLOWS=20"
    wait_log(tunnel.server, r"UDP_MAX_FLOWS reached", 5, "the flow bound's log line")
    assert metric(metrics_port, "nodepass_udp_drops_total", 'reason="flow_limit"') >= 20
    # Existing flows go on.
    assert users[0].exchange(b"still here") == b"still here"
    for user in users:
        user.close()


def test_a_flood_at_a_slow_service_stays_bounded_and_a_quiet_flow_still_works(procs, nodepass_bin, echo_service):
    start_udp_echo(procs, echo_service.port, delay_ms=2.0)
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port).use_key(KEY)
    tunnel.server_query = "&tls=0"
    tunnel.start()
    wait_udp_ready(tunnel.host, tunnel.target_port, timeout=30)
    floods = [User(tunnel.host, tunnel.target_port) for _ in range(20)]
    deadline = time.monotonic() + 4.0
    sent = 0
    payload = os.urandom(1400)
    while time.monotonic() < deadline:
        for user in floods:
            try:
                user.sock.send(payload)
                sent += 1
            except OSError:
                pass
    rss = []
    for proc in (tunnel.server, tunnel.client):
        with open(f"/proc/{proc.pid}/status") as f:
            rss.append(int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) // 1024)
    assert max(rss) < 200, f"RSS {rss} MiB after a flood of {sent} datagrams"
    quiet = User(tunnel.host, tunnel.target_port, timeout=1.0)

    def answered() -> bool:
        try:
            return quiet.exchange(b"quiet") == b"quiet"
        except OSError:
            return False

    wait_for(answered, 20, "a well-behaved flow to get its answer after the flood")
    for user in floods + [quiet]:
        user.close()


# --------------------------------------------------------------------------- real DNS software


def start_dnsmasq(procs, port: int) -> Proc:
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.access(dnsmasq, os.X_OK):
        pytest.skip("dnsmasq not installed (Debian package: dnsmasq-base)")
    proc = procs.start("dnsmasq", [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}",
                                   "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                                   "--address=/example.test/10.1.2.3", "--log-facility=-", "--cache-size=1000"])
    wait_for(lambda: dig(port, "example.test", tcp=True) == "10.1.2.3", 15, "dnsmasq to answer")
    return proc


def dig(port: int, name: str, tcp: bool = False) -> str:
    if shutil.which("dig") is None:
        pytest.skip("dig not installed (Debian package: dnsutils)")
    args = ["dig", "@127.0.0.1", "-p", str(port), name, "A", "+short", "+tries=1", "+time=2"]
    if tcp:
        args.append("+tcp")
    return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()


def dnsperf(port: int, queries: Path, seconds: int, rate: int) -> Dict[str, float]:
    result = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds),
                             "-Q", str(rate), "-c", "20"], capture_output=True, text=True, timeout=seconds + 30)
    text = result.stdout
    completed = re.search(r"Queries completed:\s+(\d+)", text)
    lost = re.search(r"Queries lost:\s+(\d+)", text)
    qps = re.search(r"Queries per second:\s+([\d.]+)", text)
    assert completed and lost and qps, f"dnsperf said: {text[-2000:]} {result.stderr[-1000:]}"
    return {"completed": int(completed.group(1)), "lost": int(lost.group(1)), "qps": float(qps.group(1))}


def test_dig_and_dnsperf_against_dnsmasq_through_the_tunnel(procs, nodepass_bin, tmp_path):
    port = free_port()
    start_dnsmasq(procs, port)
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, port,
                    probe=lambda host, target: dig(target, "example.test", tcp=True) == "10.1.2.3").use_key(KEY)
    tunnel.start()
    # The same TARGET answers over UDP and over TCP.
    wait_for(lambda: dig(tunnel.target_port, "example.test") == "10.1.2.3", 20, "dig over UDP through the tunnel")
    assert dig(tunnel.target_port, "example.test", tcp=True) == "10.1.2.3"
    if shutil.which("dnsperf") is None:
        pytest.skip("dnsperf not installed (Debian package: dnsperf)")
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"host{n}.example.test A\n" for n in range(200)))
    direct = dnsperf(port, queries, seconds=2, rate=3000)
    through = dnsperf(tunnel.target_port, queries, seconds=2, rate=3000)
    print(f"dnsperf at 3000 q/s: direct {direct}, through the tunnel {through}")
    assert through["completed"] > 0 and through["lost"] <= 0.01 * (through["completed"] + through["lost"]), through


# --------------------------------------------------------------------------- iperf3 and HTTP/3


def iperf3_udp(port: int, rate: str, seconds: int) -> Dict[str, float]:
    result = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", rate, "-l", "1200",
                             "-t", str(seconds), "--json"], capture_output=True, text=True, timeout=seconds + 30)
    report = json.loads(result.stdout or "{}")
    assert "end" in report and "sum" in report["end"], f"iperf3 said: {result.stdout[-1500:]} {result.stderr[-500:]}"
    total = report["end"]["sum"]
    return {"lost_percent": float(total["lost_percent"]), "jitter_ms": float(total["jitter_ms"]),
            "packets": float(total["packets"])}


def test_iperf3_udp_at_a_fixed_rate_through_the_tunnel(procs, nodepass_bin):
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 not installed (Debian package: iperf3)")
    port = free_port()
    # iperf3 takes its control connection over TCP and its data over UDP, on one port: both through the tunnel.
    server = procs.start("iperf3", ["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"])
    wait_for(lambda: is_listening(server.pid, port), 10, "iperf3 to listen")
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, port).use_key(KEY)
    tunnel.start_server()
    tunnel.start_client()
    tunnel.wait_client_connected(15)
    direct = iperf3_udp(port, "100M", 2)
    through = iperf3_udp(tunnel.target_port, "100M", 2)
    print(f"iperf3 -u 100 Mbit/s, 1200-byte datagrams: direct {direct}, through the tunnel {through}")
    assert through["packets"] >= 0.9 * direct["packets"]
    assert through["lost_percent"] <= 1.0, through


def test_http3_get_of_10_mib_arrives_intact(procs, nodepass_bin, tmp_path):
    pytest.importorskip("aioquic", reason="aioquic not installed (pip install aioquic)")
    crt, key = self_signed(tmp_path, "h3", "localhost")
    h3 = Path(__file__).resolve().parent / "helpers" / "h3.py"
    port = free_port()
    server = procs.start("h3-server", [sys.executable, str(h3), "serve", "--port", str(port), "--cert", str(crt),
                                       "--key", str(key)])
    wait_log(server, r"ready", 15, "the HTTP/3 server")
    # UDP only: the HTTP/3 server has nothing on TCP.
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, port).use_key(KEY)
    tunnel.server_query = "&notcp=1"
    tunnel.start_server()
    tunnel.start_client()
    tunnel.wait_client_connected(15)
    size = 10 * 1024 * 1024
    block = bytes(range(256)) * 64  # the server's body: helpers/h3.py's pattern
    expected = hashlib.sha256((block * (size // len(block) + 1))[:size]).hexdigest()
    result = subprocess.run([sys.executable, str(h3), "get", "--port", str(tunnel.target_port), "--path",
                             f"/blob/{size}", "--timeout", "90"], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"status 200 bytes {size} sha256 {expected}", result.stdout + result.stderr[-2000:]


# --------------------------------------------------------------------------- what the tunnel carries


def test_noudp_carries_tcp_only_and_notcp_udp_only(procs, nodepass_bin, echo_service):
    start_udp_echo(procs, echo_service.port)
    tcp_only = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port).use_key(KEY)
    tcp_only.server_query = "&noudp=1"
    tcp_only.start()
    wait_log(tcp_only.server, r"np\.carries=tcp\b", 5, "the server to say it carries TCP only")
    user = User(tcp_only.host, tcp_only.target_port, timeout=1.0)
    with pytest.raises(OSError):  # nobody listens for UDP there: refused (ICMP) or no answer
        user.exchange(b"hello")
    user.close()
    tcp_only.stop()

    udp_only = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port).use_key(KEY)
    udp_only.server_query = "&notcp=1"
    udp_only.start_server()
    udp_only.start_client()
    udp_only.wait_client_connected(15)
    wait_udp_ready(udp_only.host, udp_only.target_port)
    with pytest.raises(OSError):
        with connect(udp_only.host, udp_only.target_port, 2) as s:
            s.sendall(b"x")
            recv_exact(s, 1)


def test_two_clients_share_the_flows_and_one_killed_loses_only_its_own(procs, nodepass_bin, echo_service):
    tunnel = udp_tunnel(procs, nodepass_bin, echo_service)
    second = procs.start("client-2", [nodepass_bin, tunnel.client_url], env=tunnel.client_env)
    wait_log(tunnel.server, r"(?s)client authenticated.*client authenticated", 15, "the second client")
    users = [User(tunnel.host, tunnel.target_port, timeout=2.0) for _ in range(40)]
    for user in users:
        assert user.exchange(b"before") == b"before"
    assert len(re.findall(r"datagram carrier launched", tunnel.server.output())) >= 2, "one carrier per client"
    tunnel.kill_client()
    # Flows of the killed client fail until the server notices; then every user is answered again.
    for user in users:
        def answered(user=user) -> bool:
            try:
                return user.exchange(b"after") == b"after"
            except OSError:
                return False

        wait_for(answered, 20, "every user to be answered after one client died")
    assert second.alive()
    for user in users:
        user.close()


# --------------------------------------------------------------------------- the wire, by an independent peer


def start_server(procs, nodepass_bin, target_port: int, query: str = "") -> Proc:
    tunnel_port = free_port()
    # The peer sends no heartbeats: the server gives up on it after three periods, longer than each test.
    proc = procs.start("server", [nodepass_bin,
                                  f"server://{KEY}@127.0.0.1:{tunnel_port}/127.0.0.1:{target_port}?log=debug&tls=0"
                                  f"&mode=1{query}"], env={"REPORT_INTERVAL": "3s"})
    wait_log(proc, r"server started", 15, "the server to start")
    proc.tunnel_port = tunnel_port
    return proc


def test_the_python_peer_carries_a_flow_over_nodepass_2_1(procs, nodepass_bin):
    target = free_port()
    server = start_server(procs, nodepass_bin, target)
    control, session = v2_peer.handshake("127.0.0.1", server.tunnel_port, KEY, datagrams=True)
    assert control.alpn == v2_peer.ALPN_DATAGRAMS
    assert session.transports == v2_peer.CARRIES_TCP | v2_peer.CARRIES_UDP
    pool = v2_peer.PoolConnection("127.0.0.1", session.pool_port)
    pool.answer(session)
    pool_id = pool.finish(session)
    user = User("127.0.0.1", target)
    user.sock.send(b"question")
    # The launch names the pool connection; the datagram may already be on it.
    while True:
        kind, payload = v2_peer.read_frame(control.sock)
        if kind == v2_peer.LAUNCH_DATAGRAMS:
            assert struct.unpack(">I", payload)[0] == pool_id
            break
        assert kind == v2_peer.HEARTBEAT, f"unexpected control frame {kind}"
    kind, flow, payload = v2_peer.read_datagram_frame(pool.sock)
    assert (kind, payload) == (v2_peer.DATAGRAM, b"question")
    pool.sock.sendall(v2_peer.datagram_frame(flow, b"answer"))
    assert user.sock.recv(100) == b"answer"
    # An empty datagram is a datagram too.
    pool.sock.sendall(v2_peer.datagram_frame(flow, b""))
    assert user.sock.recv(100) == b""
    # A frame of an unknown kind ends the carrier.
    pool.sock.sendall(b"\x07\x00\x00\x00\x01\x00\x00")
    assert pool.closed_by_server(5)
    wait_log(server, r"datagram carrier closed: the peer broke the protocol", 5, "the server to log the violation")
    user.close()
    control.close()


def test_an_older_v2_peer_gets_tcp_only_and_a_udp_only_server_refuses_it(procs, nodepass_bin):
    target = free_port()
    server = start_server(procs, nodepass_bin, target)
    control, session = v2_peer.handshake("127.0.0.1", server.tunnel_port, KEY, datagrams=False)
    assert control.alpn == v2_peer.ALPN and session.transports is None
    pool = v2_peer.PoolConnection("127.0.0.1", session.pool_port)
    pool.answer(session)
    pool.finish(session)
    wait_log(server, r'client authenticated .*np\.udp="off \(older client\)"', 5, "the server to note the older client")
    user = User("127.0.0.1", target, timeout=1.0)
    user.sock.send(b"nobody carries this")
    with pytest.raises(socket.timeout):
        user.sock.recv(100)
    wait_log(server, r"no client carries UDP now", 5, "the server to say why the datagram was dropped")
    # Nothing but heartbeats reaches the older peer: never a frame it would not know.
    control.sock.settimeout(4)
    kind, _ = v2_peer.read_frame(control.sock)
    assert kind == v2_peer.HEARTBEAT
    control.close()

    udp_only = start_server(procs, nodepass_bin, free_port(), query="&notcp=1")
    with pytest.raises(v2_peer.ServerRefused, match="unsupported version"):
        v2_peer.handshake("127.0.0.1", udp_only.tunnel_port, KEY, datagrams=False)

"""Real traffic through a server + client pair of the binary under test."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import scenarios
from support.data import MiB
from support.ports import free_port, ipv6_loopback_available
from support.probes import echo_probe, http_probe, redis_probe
from support.tunnel import Tunnel
from support.waiting import wait_for


def test_http_download_through_tunnel_with_curl(procs, nodepass_bin, tmp_path):
    port, digest = scenarios.start_http_service(procs, tmp_path / "www")
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, port, probe=http_probe("/probe.txt", b"nodepass-probe\n"))
    tunnel.start()
    scenarios.curl_download(tunnel, digest, tmp_path)


@pytest.fixture
def redis_service(procs, tmp_path):
    server = shutil.which("redis-server")
    if server is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not installed (Debian packages: redis-server redis-tools)")
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    port = free_port()
    proc = procs.start("redis-server", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no"])
    wait_for(lambda: proc.alive() and redis_probe("127.0.0.1", port), 15, f"redis-server on port {port}")
    return port


def redis_cli(port: int, *args: str, stdin: bytes = b"", timeout: float = 30) -> bytes:
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], input=stdin,
                            capture_output=True, timeout=timeout)
    assert result.returncode == 0, f"redis-cli {args[:2]} exited {result.returncode}: {result.stderr[-500:]!r}"
    return result.stdout


def test_redis_through_tunnel(procs, nodepass_bin, redis_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, redis_service, probe=redis_probe)
    tunnel.start()
    port = tunnel.target_port

    assert redis_cli(port, "ping").strip() == b"PONG"

    value = os.urandom(MiB // 2).hex().encode()  # 1 MiB of text
    assert redis_cli(port, "-x", "SET", "e2e:big", stdin=value).strip() == b"OK"
    got = redis_cli(port, "--raw", "GET", "e2e:big")
    assert got.rstrip(b"\n") == value, f"GET returned {len(got)} bytes, differing from the 1 MiB value SET"
    assert redis_cli(port, "STRLEN", "e2e:big").strip() == str(len(value)).encode()

    if shutil.which("redis-benchmark"):
        bench = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-n", "2000", "-c",
                                "20", "-t", "set,get"], capture_output=True, timeout=120)
        assert bench.returncode == 0, f"redis-benchmark exited {bench.returncode}: {bench.stderr[-500:]!r}"
        print(bench.stdout.decode(errors="replace"))


def test_half_close_reply_still_arrives(procs, nodepass_bin, digest_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, digest_service.port, probe=scenarios.digest_probe)
    tunnel.start()
    scenarios.half_close_digest(tunnel, MiB)


def test_integrity_256mib_over_16_streams(procs, nodepass_bin, echo_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start()
    scenarios.integrity(tunnel, streams=16, mib_per_stream=16, deadline_s=200)
    # v1 data connections are plain: both sides relay them with splice(2).
    for proc in (tunnel.server, tunnel.client):
        assert "relay moved to the kernel (splice)" in proc.output(), f"{proc.name} did not splice"


@pytest.mark.ours_only
def test_splice_off_keeps_every_relay_in_user_space(procs, nodepass_bin, echo_service):
    """NODEPASS_SPLICE=0: the same integrity run relays every byte in SwiftNIO, on both sides."""
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port, env={"NODEPASS_SPLICE": "0"})
    tunnel.start()
    scenarios.integrity(tunnel, streams=4, mib_per_stream=16, deadline_s=200)
    for proc in (tunnel.server, tunnel.client):
        assert "relay moved to the kernel (splice)" not in proc.output(), f"{proc.name} spliced with NODEPASS_SPLICE=0"


def test_burst_of_200_connections(procs, nodepass_bin, echo_service):
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.start()
    scenarios.burst(tunnel, 200)


def test_ipv6_loopback_round_trip(procs, nodepass_bin):
    if not ipv6_loopback_available():
        pytest.skip("::1 is not available on this machine")
    echo6 = procs.start_helper("echo", host="::1")
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo6.port, host="::1")
    assert tunnel.server_url.startswith("server://[::1]:")
    tunnel.start()
    for _ in range(3):
        assert echo_probe("::1", tunnel.target_port, timeout=10), "IPv6 echo round trip returned other bytes"


@pytest.mark.ours_only
def test_empty_hosts_listen_everywhere_and_dial_this_machine(procs, nodepass_bin, echo_service):
    """`server://:T/:U` listens on every interface; `client://:T/:S` dials this machine."""
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.server = procs.start("server", [nodepass_bin, f"server://:{tunnel.tunnel_port}/:{tunnel.target_port}"],
                                env=tunnel.server_env)
    tunnel.wait_server_listening(20)
    tunnel.client = procs.start("client", [nodepass_bin, f"client://:{tunnel.tunnel_port}/:{echo_service.port}"],
                                env=tunnel.client_env)
    tunnel.wait_client_connected(20)
    tunnel.wait_ready(20)
    for host in ("127.0.0.1", "::1") if ipv6_loopback_available() else ("127.0.0.1",):
        assert echo_probe(host, tunnel.target_port, timeout=10), host
    assert 'np.protocol="v1 ' in tunnel.server.output()

"""Prometheus metrics: scraped during traffic, the counters move by exactly the traffic's amounts."""

from __future__ import annotations

import re
import select
import urllib.request

import pytest

from support.ports import free_port
from support.sockets import connect, recv_all
from support.tunnel import Tunnel
from support.waiting import wait_for

pytestmark = pytest.mark.ours_only

SAMPLE = re.compile(r'^([a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$')


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = tuple(sorted(p.split("=", 1)[0] + "=" + p.split("=", 1)[1].strip('"')
                                  for p in m.group(2).split(",") if p))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(f"{k}={v}" for k, v in labels.items())))
    return samples.get(key, 0.0)


def test_counters_move_by_the_traffic(procs, nodepass_bin, echo_service):
    server_metrics, client_metrics = free_port(), free_port()
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.server_query = f"&metrics=127.0.0.1:{server_metrics}"
    tunnel.client_query = f"&metrics=127.0.0.1:{client_metrics}"
    tunnel.start()

    # Readiness probes have moved the counters already: measure deltas. Wait for probe sessions to end.
    wait_for(lambda: value(scrape(server_metrics), "nodepass_connections_active", role="server") == 0, 10,
             "probe sessions to end")
    before_s, before_c = scrape(server_metrics), scrape(client_metrics)

    sizes = [1, 1000, 65536, 300_000, 1_048_576]
    for size in sizes:
        with connect(tunnel.host, tunnel.target_port, timeout=10) as user:
            payload = bytes([size % 251]) * size
            user.sendall(payload)
            user.shutdown(1)
            assert recv_all(user) == payload
    total = sum(sizes)

    def settled():
        s = scrape(server_metrics)
        return s if value(s, "nodepass_connections_active", role="server") == 0 else None
    after_s = wait_for(settled, 10, "sessions to end")
    after_c = wait_for(lambda: (lambda c: c if value(c, "nodepass_connections_active", role="client") == 0
                                else None)(scrape(client_metrics)), 10, "client sessions to end")

    def delta(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(before_s, after_s, "nodepass_connections_accepted_total", role="server") == len(sizes)
    assert delta(before_c, after_c, "nodepass_connections_accepted_total", role="client") == len(sizes)
    for role, before, after in (("server", before_s, after_s), ("client", before_c, after_c)):
        assert delta(before, after, "nodepass_relay_bytes_total", role=role, direction="upstream") == total
        assert delta(before, after, "nodepass_relay_bytes_total", role=role, direction="downstream") == total
    assert value(after_c, "nodepass_pool_capacity", role="client") >= 16
    assert value(after_s, "nodepass_pool_idle_connections", role="server") >= 1
    assert value(after_s, "nodepass_tls_handshake_duration_seconds_count", role="server") >= 1
    assert delta(before_s, after_s, "nodepass_new_connection_duration_seconds_count", role="server") == len(sizes)


def test_user_over_pool_wait_counts_a_failure(procs, nodepass_bin, echo_service):
    server_metrics = free_port()
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.server_query = f"&metrics=127.0.0.1:{server_metrics}"
    tunnel.start_server()
    wait_for(lambda: scrape(server_metrics) is not None, 10, "metrics endpoint")
    with connect(tunnel.host, tunnel.target_port, timeout=10) as user:
        user.settimeout(15)
        try:
            assert user.recv(1) == b""
        except ConnectionResetError:
            pass
    samples = scrape(server_metrics)
    assert value(samples, "nodepass_connections_failed_total", role="server", reason="pool_wait") == 1
    assert value(samples, "nodepass_connections_accepted_total", role="server") == 1


def test_idle_sockets_on_the_metrics_port_take_a_bounded_number_of_descriptors(procs, nodepass_bin, echo_service):
    """300 idle connections to the metrics port (anyone who reaches it can open them): the server holds at
    most 16 of them, the tunnel still serves, and a scrape still gets in."""
    from support.procfs import TCP_ESTABLISHED, tcp_sockets

    server_metrics = free_port()
    tunnel = Tunnel(procs, nodepass_bin, nodepass_bin, echo_service.port)
    tunnel.server_query = f"&metrics=127.0.0.1:{server_metrics}"
    tunnel.start()
    wait_for(lambda: scrape(server_metrics) is not None, 10, "metrics endpoint")
    idle = []
    try:
        for _ in range(300):
            idle.append(connect(tunnel.host, server_metrics, timeout=5))

        def held() -> int:
            return sum(1 for s in tcp_sockets(tunnel.server.pid)
                       if s.local_port == server_metrics and s.state == TCP_ESTABLISHED)

        # The server accepts all 300 (on either event loop, so not quite in order) and closes all but the
        # newest 16 it admitted.
        closed = set()

        def count_closed() -> int:
            readable, _, _ = select.select([s for s in idle if s not in closed], [], [], 0.2)
            for sock in readable:
                try:
                    if sock.recv(1) == b"":
                        closed.add(sock)
                except ConnectionResetError:
                    closed.add(sock)
            return len(closed)

        wait_for(lambda: count_closed() >= 284, 15, "the server to close the oldest metrics connections")
        assert held() == 16 and count_closed() == 284, (held(), len(closed))
        before = value(scrape(server_metrics), "nodepass_connections_accepted_total", role="server")
        with connect(tunnel.host, tunnel.target_port, timeout=5) as user:
            user.sendall(b"still served\n")
            assert user.recv(64) == b"still served\n"
        after = value(scrape(server_metrics), "nodepass_connections_accepted_total", role="server")
        assert after == before + 1, (before, after)
    finally:
        for sock in idle:
            sock.close()
